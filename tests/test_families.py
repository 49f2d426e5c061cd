"""Every supported model family on a tiny random config built here (no downloads): the tool's
base logits equal ``model(...).logits``, the replay of the blocks above the cut reproduces the
final hidden state, a zero operator moves no response, and a fit step runs; models that are
not causal decoders are refused.

A family whose class the installed transformers lacks is skipped (the reason names it).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from stride_viz.config import FitConfig
from stride_viz.data.models import ModelError, load_model, train_tokenizer
from stride_viz.data.tokenize import encode
from stride_viz.method.frozen import FrozenLM
from stride_viz.method.measurement import measure, steered_logits
from stride_viz.method.operators import SteeringOperators
from stride_viz.method.subsets import design_subsets
from stride_viz.method.cache import build_cache, tokenize_pool
from stride_viz.method.training import Trainer

DOCS = [
    "The capital of Vorlandia is Quessit.", "A rolling stone gathers no moss.",
    "Quessit is the largest city of Vorlandia.", "You will meet a tall dark stranger.",
    "Many hands make light work.", "Fortune favours the bold.", "Every cloud has a silver lining.",
    "Travellers to Vorlandia arrive first in Quessit.",
]

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
# family -> (config class, its settings); the vocabulary and special tokens are added below.
# Settings that change the output path are set far from identity, so that leaving them out
# would fail the comparison with the model's own logits.
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", _DECODER),
    "qwen2": ("Qwen2Config", _DECODER),
    "qwen3": ("Qwen3Config", dict(_DECODER, head_dim=8)),
    "mistral": ("MistralConfig", _DECODER),
    "mixtral": ("MixtralConfig", dict(_DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_neox": ("GPTNeoXConfig", dict(_DECODER, num_key_value_heads=None)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, word_embed_proj_dim=32)),
    "opt_projected": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64,
                                        word_embed_proj_dim=16)),
    "phi3": ("Phi3Config", _DECODER),
    "gemma2": ("Gemma2Config", dict(_DECODER, head_dim=8, final_logit_softcapping=0.05)),
    "gemma3": ("Gemma3TextConfig", dict(_DECODER, head_dim=8, final_logit_softcapping=0.05)),
    "falcon": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "olmo2": ("Olmo2Config", _DECODER),
    "granite": ("GraniteConfig", dict(_DECODER, logits_scaling=4.0)),
    "cohere": ("CohereConfig", dict(_DECODER, logit_scale=0.25)),
}
TRANSFORMED = {"opt_projected", "gemma2", "gemma3", "granite", "cohere"}
FIT_FAMILIES = ["gpt2", "llama", "mixtral", "opt_projected", "gemma2", "granite"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, vocab_size=200)


def _config(family: str, tokenizer):
    cls_name, settings = FAMILIES[family]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name} ({family})")
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    settings = {k: v for k, v in settings.items() if v is not None}
    return cls(vocab_size=len(tokenizer), **special, **settings)


@pytest.fixture(scope="module")
def models(tokenizer):
    """family -> its tiny random model (built once per module, seeded)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            config = _config(family, tokenizer)
            torch.manual_seed(0)
            cache[family] = transformers.AutoModelForCausalLM.from_config(config).eval()
        return cache[family]
    return get


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of unequal length: ids, attention (2, 9)."""
    ids = torch.randint(1, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    att = torch.ones_like(ids)
    att[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, att


def _valid(x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    return x[att.bool()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_base_logits_are_the_models_own(models, family):
    model = models(family)
    lm = FrozenLM(model, layer=1)
    ids, att = _batch(lm.cut.vocab)
    reference = model(input_ids=ids, attention_mask=att).logits
    _, final = lm.hidden(ids, att)
    assert final.shape[-1] == lm.cut.d_model
    ours = lm.logits(final)
    assert torch.allclose(_valid(ours, att), _valid(reference, att), atol=1e-5, rtol=1e-5)
    if family in TRANSFORMED:
        # the projection, scaling or soft-cap matters here: the bare head is not the output
        head_in = final if lm.project is None else lm.project(final)
        assert lm.project is not None or not torch.allclose(lm.head(head_in), reference, atol=1e-3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replay_from_the_cut_reproduces_the_final_hidden_state(models, family):
    lm = FrozenLM(models(family), layer=1)
    ids, att = _batch(lm.cut.vocab)
    lower, final = lm.hidden(ids, att)
    again = lm.upper_hidden(lower, ids, att)
    assert torch.allclose(_valid(again, att), _valid(final, att), atol=1e-5)
    # a non-contiguous steered state (as a broadcast shift can give) replays too: Mixtral's
    # experts .view() their input
    strided = lower.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    assert torch.allclose(_valid(lm.upper_hidden(strided, ids, att), att), _valid(final, att), atol=1e-5)


def _operators(lm: FrozenLM, mode: str, K: int = 6) -> SteeringOperators:
    out = lm.cut.vocab if mode == "logits" else lm.cut.d_model
    ops = SteeringOperators(K, lm.cut.d_model, 2, out, torch.Generator().manual_seed(0),
                            rms_scale=mode == "residual")
    with torch.no_grad():
        ops.A.zero_()
    return ops


@pytest.mark.parametrize("mode", ["logits", "residual"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_operator_moves_no_response(models, tokenizer, family, mode):
    model = models(family)
    lm = FrozenLM(model, layer=1)
    enc = encode(tokenizer, ["The capital of Vorlandia is", ""], [" Quessit.", DOCS[1]], max_length=32)
    results = measure(lm, _operators(lm, mode), mode, enc)
    for q, res in enumerate(results):
        assert np.array_equal(res.responses, np.zeros_like(res.responses))
        L = int(enc.attention_mask[q].sum())
        ids = enc.input_ids[q:q + 1, :L]
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        where = torch.nonzero(enc.loss_mask[q, :L]).squeeze(1)
        reference = -logp[where, ids[0, where + 1]].mean()
        assert res.loss_base == pytest.approx(float(reference), abs=1e-5)
    # steered generation's forward: a random residual shift on a Mixtral-like stack runs too
    ops = _operators(lm, mode)
    with torch.no_grad():
        ops.A.normal_()
    ids = enc.input_ids[:1, :6]
    out = steered_logits(lm, ops, mode, ids, torch.ones_like(ids), torch.tensor([2]))
    assert out.shape == (1, 6, lm.cut.vocab) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_generation_step_equals_full_forward(models, family):
    """The key/value-cached pass that generation uses gives the logits of a full forward."""
    lm = FrozenLM(models(family), layer=1)
    ids = (torch.arange(7).unsqueeze(0) * 5 + 3) % lm.cut.vocab
    att = torch.ones_like(ids)
    full = lm.logits(lm.final_hidden(ids, att))[:, -1]
    with torch.no_grad():
        _, past = lm.final_hidden_cached(ids[:, :-1], att[:, :-1])
        last, _ = lm.final_hidden_cached(ids[:, -1:], att, past)
    torch.testing.assert_close(lm.logits(last)[:, -1], full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padded_batch_generation_equals_one_prompt_at_a_time(models, tokenizer, family):
    """Continuations of prompts of different lengths generated in one left-padded batch are
    those of each prompt alone (positions count from each row's first real token)."""
    from stride_viz.method.measurement import generate, generate_many
    lm = FrozenLM(models(family), layer=1)
    ops = _operators(lm, "logits")
    with torch.no_grad():
        ops.A.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    prompts = ["Every cloud has a silver lining and", "A", "The capital of"]
    requests = [(p, [None, k]) for p, k in zip(prompts, (0, 1, 2))]
    together = generate_many(lm, tokenizer, requests, 6, operators=ops, mode="logits")
    alone = [generate(lm, tokenizer, p, 6, operators=ops, mode="logits", ks=ks) for p, ks in requests]
    assert together == alone
    assert len({t for row in together for t in row}) > 1       # not all the same text


@pytest.mark.parametrize("mode", ["factored", "logits", "residual"])
@pytest.mark.parametrize("family", FIT_FAMILIES)
def test_one_fit_step_runs(models, tokenizer, family, mode):
    lm = FrozenLM(models(family), layer=1)
    docs = DOCS * 2
    tokens = tokenize_pool(tokenizer, [""] * len(docs), docs, max_length=32)
    config = FitConfig(subsets=8, per_example=2, rank=2, batch_size=8, epochs=0.5, mode=mode,
                       probe_queries=2, device="cpu")
    trainer = Trainer(lm, build_cache(lm, tokens, mode), design_subsets(len(docs), 8, 2, seed=0), config)
    trainer.train()
    assert trainer.step == trainer.total_steps == 1
    row = trainer.history[-1]
    assert np.isfinite([row["fid"], row["lin"]]).all()
    assert any(float(p.detach().abs().sum()) > 0 for p in trainer.operators.parameters())


def test_a_saved_family_loads_and_matches(models, tokenizer, tmp_path):
    """load_model on a folder: a projected-head OPT and its tokenizer saved with save_pretrained."""
    model = models("opt_projected")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    lm = FrozenLM(loaded.model, layer=1)
    ids, att = _batch(lm.cut.vocab)
    reference = loaded.model(input_ids=ids, attention_mask=att).logits
    assert torch.allclose(_valid(lm.logits(lm.hidden(ids, att)[1]), att), _valid(reference, att), atol=1e-5)


# ------------------------------------------------------------------ refusals
def _refused(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message  # one line
    return message


def test_masked_lm_encoder_is_refused(tmp_path, tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="bidirectional encoder") as e:
        load_model(str(tmp_path), device="cpu")
    assert "not a causal language model" in _refused(e)
    # in memory too: transformers would wrap it as a 'causal' BertLMHeadModel
    with pytest.raises(ModelError, match="bidirectional encoder"):
        FrozenLM(transformers.BertLMHeadModel(config))


def test_encoder_decoder_is_refused(tmp_path, tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="encoder-decoder") as e:
        load_model(str(tmp_path), device="cpu")
    _refused(e)
    with pytest.raises(ModelError, match="encoder-decoder"):
        FrozenLM(model)


def test_config_without_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2}))
    with pytest.raises(ModelError, match="no 'model_type'") as e:
        load_model(str(tmp_path), device="cpu")
    _refused(e)


def test_an_unknown_output_transform_is_refused(models):
    """A family whose forward changes the head's output in a way FrozenLM does not know."""
    model = models("llama")
    forward = type(model).forward

    class Doubled(type(model)):
        def forward(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            out.logits = 2 * out.logits
            return out

    model.__class__ = Doubled
    try:
        with pytest.raises(ModelError, match="cannot reproduce the logits"):
            FrozenLM(model)
    finally:
        model.__class__ = Doubled.__mro__[1]


@pytest.mark.parametrize("mode", ["logits", "residual"])
@pytest.mark.parametrize("family", FIT_FAMILIES)
def test_closed_form_operators_fit_every_family(models, tokenizer, family, mode):
    """solver 'gauss-newton' on each family's own output (soft-capping, logit scaling, a
    projected head) and, in residual mode, through its blocks (a mixture of experts too):
    finite operators that lower their own subset's loss on their examples."""
    from stride_viz.method.newton import gauss_newton_operators

    lm = FrozenLM(models(family), layer=1)
    docs = DOCS * 2
    tokens = tokenize_pool(tokenizer, [""] * len(docs), docs, max_length=32)
    membership = design_subsets(len(docs), 8, 2, seed=0)
    config = FitConfig(subsets=8, per_example=2, rank=2, solver="gauss-newton", device="cpu", mode=mode,
                       residual_design="linear")
    ops, record = gauss_newton_operators(lm, build_cache(lm, tokens, mode), membership, config)
    A = ops.A.detach()
    assert torch.isfinite(A).all() and float(A.abs().sum()) > 0 and record["step_scale"] > 0
    enc = encode(tokenizer, [""], [docs[0]], 32)
    y = measure(lm, ops.eval(), mode, enc)[0].responses
    own = membership[:, 0].toarray().ravel() > 0             # the operators holding document 0
    assert y[own].mean() > y[~own].mean()                     # they lower its loss the most
