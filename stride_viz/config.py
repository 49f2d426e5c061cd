"""Typed settings of a STRIDE fit and of the per-query sparse recovery.

Every field has a default, a help text (shown by the CLI and the dashboard) and a range
check in ``__post_init__`` whose message names the field, the allowed range and the value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

__all__ = ["FitConfig", "RecoveryConfig", "ConfigError", "help_of", "config_diff", "CHOICES"]

# The allowed values of every setting that takes one of a few words (forms list them).
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("logits", "factored", "residual"),
    "solver": ("adam", "gauss-newton"),
    "residual_design": ("memory", "linear"),
    "vocabulary": ("pool", "subset", "full"),
    "cache": ("auto", "memory", "disk", "stream"),
    "precision": ("auto", "float32", "bfloat16"),
    "selection": ("cv", "cv-1se", "nonzeros"),
}


def _check_choice(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if value not in CHOICES[name]:
        words = ", ".join(repr(c) for c in CHOICES[name])
        raise ConfigError(f"The '{name}' parameter of {type(obj).__name__} must be one of {words}. "
                          f"Got {value!r} instead.")


class ConfigError(ValueError):
    """A setting out of its range, or a run reopened with different settings."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls``."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}[name]


def _check_range(obj: Any, name: str, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> None:
    value = getattr(obj, name)
    kind = "an integer" if integer else "a number"
    lo_s = "-inf" if lo is None else repr(lo)
    hi_s = "inf" if hi is None else repr(hi)
    rng = f"{'(' if lo_open or lo is None else '['}{lo_s}, {hi_s}{']' if hi is not None else ')'}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if integer:
        ok = ok and float(value).is_integer()
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise ConfigError(f"The '{name}' parameter of {type(obj).__name__} must be {kind} in the "
                          f"range {rng}. Got {value!r} instead.")


@dataclass
class FitConfig:
    """Settings of stages 1-2 (subset design and operator training). Changing any of them
    means a new fit; reopening a run with different values is refused."""

    subsets: int = _f(1024, "K: number of random training subsets, one steering operator each. "
                            "More subsets give a better-posed recovery (LDS 0.39 -> 0.47 -> 0.50 at "
                            "K 512 / 1024 / 2048 on the benchmark) at a per-query cost that grows "
                            "with K; the pool needs at least K / d examples.")
    per_example: int = _f(8, "d: number of subsets every training example is put into.")
    rank: int = _f(8, "r: width of the shared low-rank basis B that every operator reads.")
    layer: Optional[int] = _f(None, "Steering layer: operators act on the residual stream after "
                                    "this block (1-based). Default: round(0.6 x depth).")
    mode: str = _f("logits", "Operator design. 'factored': each operator is an r x r2 matrix read "
                             "through one shared, trained output basis onto the pool's tokens "
                             "(its size does not grow with the vocabulary); 'logits': an r x |C| "
                             "shift of the logits of the pool's tokens per operator (the first "
                             "design: K x r x |C| numbers); 'residual': a low-rank shift of the "
                             "residual stream after the steering layer.")
    residual_design: str = _f("memory", "Residual mode's operator. 'memory': operator k is a key-value "
                                        "memory of its own, shift = rms(h) relu(B[k] h / rms(h)) A[k] with "
                                        "memory_slots keys B[k] and values A[k] (slots x D each); 'linear': "
                                        "rms(h) B(h / rms(h)) A[k] through one shared basis B of width rank "
                                        "(the first design, runs made before this setting). On the demo "
                                        "model's planted facts, after the last block: recall@10 0.65 "
                                        "(memory, 64 slots) against 0.54 (linear, rank 64); logits mode 0.98.")
    memory_slots: int = _f(64, "Residual mode, design 'memory': key-value slots per operator (2 x slots x D "
                               "numbers each).")
    inner_rank: int = _f(64, "r2: width of the shared output basis U (r2 x |C|) in factored mode.")
    vocabulary: str = _f("pool", "Output columns of the logits-space modes. 'pool': every operator "
                                 "shifts the tokens that occur in the pool (K x r x |C| numbers in "
                                 "logits mode: GPT-2's 50,257-token vocabulary, 1,000 fortunes: |C| "
                                 "about 6k); 'subset': in logits mode each operator shifts only the "
                                 "tokens of its own subset (r x |C_k| numbers per operator; LDS 0.21 "
                                 "vs 0.46 on the benchmark's development queries; in factored mode "
                                 "this means 'pool'); 'full': every token (K x r x V numbers). The "
                                 "loss over the tokens left out stays exact.")
    solver: str = _f("adam", "How the operators are fitted. 'adam': trained jointly with the basis by "
                             "AdamW on the fidelity, stability and linearity losses (epochs, lr, ...); "
                             "'gauss-newton' (logits mode with vocabulary 'pool' or 'full', or residual "
                             "mode with residual_design 'linear'): each operator is one damped "
                             "Gauss-Newton step of its subset's fidelity loss, in closed form, through a "
                             "basis of the hidden states' top principal directions (two passes over the "
                             "pool, no training; the training settings do not act). LDS benchmark, "
                             "development queries: logits 0.535 against 0.408 (adam); residual (rank 64, "
                             "after the last block) 0.267 against -0.002 (adam). The demo's planted "
                             "facts, recall@10: logits 0.90 at rank 8, 0.95 at 16, 0.97 at 32 (adam "
                             "0.98); residual 0.79 at rank 64 after the last block, 0.83 at damping 0.01 "
                             "(adam, memory: 0.65).")
    damping: float = _f(0.1, "Solver 'gauss-newton': damping of the Kronecker-factored curvature, as "
                             "a fraction of its mean eigenvalue (smaller: closer to a Newton step, "
                             "noisier).")
    warmup: float = _f(0.0, "Fraction of the training steps over which the learning rate rises "
                            "linearly from lr / steps to lr.")
    seed: int = _f(0, "Seed of the subset design, the initialisation and the batch order.")
    epochs: float = _f(3.0, "Passes over the pool during operator training.")
    batch_size: int = _f(32, "Training examples per optimisation step.")
    lr: float = _f(1e-2, "AdamW learning rate of the operators and the basis.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    stability_weight: float = _f(0.0, "beta: weight of the stability loss (KL to the base model "
                                      "on examples outside an operator's subset). Off by default: "
                                      "it keeps operators from moving held-out queries, which "
                                      "lowered LDS on the benchmark (0.47 without, 0.42 with beta 1).")
    linearity_weight: float = _f(0.1, "eta: weight of the linearity loss (responses of probe "
                                      "queries should lie near the column space of the sketch of M).")
    outside_per_example: int = _f(2, "Operators outside an example's subsets that are evaluated "
                                     "on it per step for the stability loss.")
    probe_queries: int = _f(4, "Probe examples per linearity step (each costs as much as one "
                               "example under linearity_operators operators).")
    linearity_every: int = _f(4, "Run the linearity loss every this many steps (0 = never); each "
                                 "such step costs about probe_queries x linearity_operators / "
                                 "(batch_size x per_example) of a training step more.")
    linearity_operators: int = _f(64, "Operators whose responses to the probes are checked for "
                                      "linearity per linearity step.")
    sketch_dim: int = _f(64, "q: columns of the Johnson-Lindenstrauss sketch M R.")
    sketch_ridge: float = _f(1e-3, "gamma: ridge term of the sketch projection.")
    max_length: int = _f(64, "Training examples are truncated to this many tokens.")
    fidelity_temperature: float = _f(1.0, "T: the fidelity loss scores the steered logits base / T + "
                                          "shift instead of base + shift (logits-space modes, "
                                          "vocabulary 'pool' or 'full'). T > 1 softens what the "
                                          "model already predicts with certainty, so a training "
                                          "example the model has memorised (its tokens' loss near 0) "
                                          "still teaches its operators to raise its tokens; the "
                                          "measurement is unchanged (T = 1). 1: the loss as the "
                                          "method defines it.")
    tokens_per_example: int = _f(24, "Logits-space modes: scored tokens of an example (and of a "
                                     "linearity probe) used per step, drawn at random when it has "
                                     "more (an unbiased estimate of its loss); the step's cost "
                                     "grows linearly with it.")
    cache_memory_mb: float = _f(2048.0, "The pool's cached hidden states (16-bit) move to a file "
                                        "in the run folder (memory-mapped, deleted after the fit) "
                                        "when they would take more than this many MiB.",
                                fingerprint=False)
    cache: str = _f("auto", "Where the pool's hidden states live during the fit: 'memory', "
                            "'disk' (a memory-mapped file in the run folder), 'auto' (disk when "
                            "they exceed cache_memory_mb) or 'stream' (none: every step reruns "
                            "the frozen model on its own examples; no pass over the pool first, "
                            "for pools too large to pass over).", fingerprint=False)
    precision: str = _f("auto", "'auto': the frozen model runs under bfloat16 autocast on a GPU "
                                "that supports it and in float32 elsewhere; 'float32'; 'bfloat16' "
                                "(GPU only). The operators and losses stay float32.",
                        fingerprint=False)
    keep_checkpoint: bool = _f(False, "Keep the fit's last checkpoints (fit/checkpoint*.safetensors, "
                                      "operators plus optimiser state: about 3x operators.safetensors) "
                                      "once the operators are written, so that damaged operators are "
                                      "rebuilt from them without refitting. Off: they are deleted (a "
                                      "refit is deterministic and gives the same operators).",
                               fingerprint=False)
    checkpoint_every: int = _f(50, "Write a resumable checkpoint every this many steps (and "
                                   "always at the end and when stopped); it does not change "
                                   "the result, so a run may be resumed with another value.",
                               fingerprint=False)
    device: str = _f("auto", "'auto' (cuda when available), 'cpu' or 'cuda'.", fingerprint=False)

    def __post_init__(self) -> None:
        _check_range(self, "subsets", 2, 1_000_000, integer=True)
        _check_range(self, "per_example", 1, None, integer=True)
        if self.per_example > self.subsets:
            raise ConfigError(f"The 'per_example' parameter of FitConfig must be at most "
                              f"'subsets' ({self.subsets}). Got {self.per_example} instead.")
        _check_range(self, "rank", 1, 4096, integer=True)
        if self.layer is not None:
            _check_range(self, "layer", 1, None, integer=True)
        _check_choice(self, "mode")
        _check_range(self, "inner_rank", 1, 65536, integer=True)
        _check_choice(self, "residual_design")
        _check_range(self, "memory_slots", 1, 4096, integer=True)
        _check_choice(self, "vocabulary")
        _check_choice(self, "solver")
        _check_range(self, "damping", 0, 1e6, lo_open=True)
        if self.solver == "gauss-newton" and not (
                (self.mode == "logits" and self.vocabulary != "subset")
                or (self.mode == "residual" and self.residual_design == "linear")):
            raise ConfigError(f"The 'solver' 'gauss-newton' works in mode 'logits' with vocabulary "
                              f"'pool' or 'full', or in mode 'residual' with residual_design "
                              f"'linear'; got mode {self.mode!r}, vocabulary {self.vocabulary!r}, "
                              f"residual_design {self.residual_design!r}: use solver 'adam' there.")
        _check_range(self, "warmup", 0, 1)
        _check_range(self, "linearity_operators", 1, 1_000_000, integer=True)
        _check_range(self, "cache_memory_mb", 0, None)
        _check_choice(self, "cache")
        _check_choice(self, "precision")
        _check_range(self, "seed", 0, 2**32 - 1, integer=True)
        _check_range(self, "epochs", 0, 1000, lo_open=True)
        _check_range(self, "batch_size", 1, 65536, integer=True)
        _check_range(self, "lr", 0, 10, lo_open=True)
        _check_range(self, "weight_decay", 0, 10)
        _check_range(self, "stability_weight", 0, 1e6)
        _check_range(self, "linearity_weight", 0, 1e6)
        _check_range(self, "outside_per_example", 0, 1024, integer=True)
        _check_range(self, "probe_queries", 1, 1024, integer=True)
        _check_range(self, "linearity_every", 0, 1_000_000, integer=True)
        _check_range(self, "sketch_dim", 1, 100_000, integer=True)
        _check_range(self, "sketch_ridge", 0, 1e6, lo_open=True)
        _check_range(self, "max_length", 2, 1_000_000, integer=True)
        _check_range(self, "tokens_per_example", 1, 1_000_000, integer=True)
        _check_range(self, "fidelity_temperature", 0, 1000, lo_open=True)
        if self.fidelity_temperature != 1.0 and (self.mode == "residual" or self.vocabulary == "subset"):
            raise ConfigError(f"The 'fidelity_temperature' parameter of FitConfig applies to the "
                              f"logits-space modes with vocabulary 'pool' or 'full'; use 1 with mode "
                              f"{self.mode!r} and vocabulary {self.vocabulary!r}. Got "
                              f"{self.fidelity_temperature!r} instead.")
        _check_range(self, "checkpoint_every", 1, 1_000_000, integer=True)
        if not isinstance(self.keep_checkpoint, bool):
            raise ConfigError(f"The 'keep_checkpoint' parameter of FitConfig must be true or false. "
                              f"Got {self.keep_checkpoint!r} instead.")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"The 'device' parameter of FitConfig must be 'auto', 'cpu' or "
                              f"'cuda'. Got {self.device!r} instead.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The fields that define the fit's result (the device does not). A fidelity
        temperature of 1 (the loss as it was before the setting existed) is left out, so runs
        made before it keep their folder names and reopen unchanged."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("fingerprint", True) and f.name not in self._unused()}

    def _unused(self) -> set[str]:
        """Fields left out of the fingerprint because they do not act in this fit, at the value
        that reproduces the fits made before they existed (so those runs keep their folder
        names and reopen unchanged): a fidelity temperature of 1; the residual design outside
        residual mode, or 'linear' (the only design before); the memory size outside it; the
        solver 'adam' (the only one before) and the damping that only 'gauss-newton' reads."""
        unused = set()
        if self.fidelity_temperature == 1.0:
            unused.add("fidelity_temperature")
        if self.mode != "residual" or self.residual_design == "linear":
            unused.add("residual_design")
        if self.mode != "residual" or self.residual_design != "memory":
            unused.add("memory_slots")
        if self.solver == "adam":   # the only solver before the setting existed
            unused.update(("solver", "damping"))
        return unused

    @classmethod
    def from_stored(cls, data: dict) -> "FitConfig":
        """The config of a run folder's run.json: a residual run stored without a
        'residual_design' was fitted before the setting existed, with the linear design."""
        if data.get("mode") == "residual" and "residual_design" not in data:
            data = {**data, "residual_design": "linear"}
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "FitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown FitConfig setting(s): {', '.join(unknown)}. "
                              f"Known: {', '.join(sorted(known))}.")
        return cls(**data)


@dataclass
class RecoveryConfig:
    """Settings of stage 4 (per-query Lasso). Cheap to change: no refit needed."""

    path_length: int = _f(60, "Number of lambda values on the log grid from lambda_max down.")
    eps: float = _f(1e-3, "Smallest lambda as a fraction of lambda_max.")
    max_nonzero: Optional[int] = _f(None, "Stop the path once this many examples are non-zero "
                                          "(default: min(K, n)/2: beyond K/2 the fit interpolates noise, "
                                          "beyond n/2 the scores are no longer sparse).")
    cv_folds: int = _f(5, "Folds of operators held out to choose lambda.")
    selection: str = _f("cv", "'cv': lambda with the lowest held-out error; 'cv-1se': largest "
                              "lambda within one standard error of it (sparser); 'nonzeros': the "
                              "first lambda with at least target_nonzeros non-zero examples.")
    target_nonzeros: int = _f(20, "Non-zero examples wanted when selection = 'nonzeros'.")
    seed: int = _f(0, "Seed of the cross-validation folds.")

    def __post_init__(self) -> None:
        _check_range(self, "path_length", 2, 10_000, integer=True)
        _check_range(self, "eps", 0, 1, lo_open=True)
        if self.max_nonzero is not None:
            _check_range(self, "max_nonzero", 1, None, integer=True)
        _check_range(self, "cv_folds", 2, 100, integer=True)
        _check_choice(self, "selection")
        _check_range(self, "target_nonzeros", 1, None, integer=True)
        _check_range(self, "seed", 0, 2**32 - 1, integer=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_diff(old: dict, new: dict) -> list[str]:
    """Human-readable lines 'name: old -> new' for every differing key."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
