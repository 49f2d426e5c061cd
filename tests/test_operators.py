"""The operator module alone: its three ways of applying a shift agree, in every design."""
from __future__ import annotations

import pytest
import torch

from stride_viz.method.operators import SteeringOperators

DESIGNS = [dict(), dict(bias=True), dict(own_basis=True), dict(bias=True, own_basis=True),
           dict(own_basis=True, gated=True), dict(gated=True)]


def _ops(**kw) -> SteeringOperators:
    ops = SteeringOperators(5, 12, 3, 12, torch.Generator().manual_seed(0), rms_scale=True, **kw)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ops.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    return ops


@pytest.mark.parametrize("kw", DESIGNS)
def test_shift_rows_and_shift_all_equal_the_per_pair_shift(kw):
    ops = _ops(**kw)
    h = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(2)) * 7.0
    sel = torch.tensor([[0, 3], [4, 1]])
    rows = ops.shift_rows(h, sel)                                          # (2, 2, 4, 12)
    for b in range(2):
        pair = ops.shift(h[b].expand(2, -1, -1), sel[b])                   # (2, 4, 12)
        every = ops.shift_all(h[b])                                        # (5, 4, 12)
        assert torch.allclose(rows[b], pair, atol=1e-5)
        assert torch.allclose(rows[b], every[sel[b]], atol=1e-5)
        assert torch.allclose(ops.shift_all(h[b], sel[b]), pair, atol=1e-5)


@pytest.mark.parametrize("kw", DESIGNS)
def test_round_trip_through_tensors_keeps_the_design(kw):
    ops = _ops(**kw)
    again = SteeringOperators.from_tensors(ops.to_tensors(), rms_scale=True)
    assert (again.bias is None) == ("bias" not in kw)
    assert (again.gated is None) == ("gated" not in kw)
    assert again.basis.shape == ops.basis.shape
    h = torch.randn(3, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.shift_all(h), ops.shift_all(h))


@pytest.mark.parametrize("kw", DESIGNS)
def test_a_fresh_operator_shifts_nothing_unless_initialised_non_zero(kw):
    h = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(4))
    fresh = SteeringOperators(5, 12, 3, 12, torch.Generator().manual_seed(0), rms_scale=True, **kw)
    assert torch.equal(fresh.shift_all(h), torch.zeros(5, 2, 3, 12))
    noisy = SteeringOperators(5, 12, 3, 12, torch.Generator().manual_seed(0), rms_scale=True,
                              init_scale=0.1, **kw)
    shift = noisy.shift_all(h)
    ratio = float(shift.detach().pow(2).mean().sqrt() / h.pow(2).mean().sqrt())
    assert 0.03 < ratio < 0.3          # norm-matched: about 0.1 of the stream's RMS
