"""Language models: load any Hugging Face causal LM, build the demo model, and the one LM
training recipe of the project.

- ``load_model(spec)``: ``spec`` is a local folder written by ``save_pretrained``, a Hugging
  Face hub id (only if it is cached or the hub is reachable), or ``demo`` / ``demo:tiny`` /
  ``demo:small``: a small GPT-2 trained from scratch on the built-in ``fortunes+facts`` pool,
  loaded from the checkpoint shipped in ``stride_viz/data/demo_model/<preset>`` when there is
  one made by the preset's recipe (its weights hash checked), else trained the first time it
  is asked for (then kept under ``data_home()/models``).
- ``train_lm``: AdamW with warm-up and cosine decay on the mean next-token loss of each
  example's completion tokens (the whole text for plain documents). Deterministic per seed;
  also used to retrain models on pool subsets for the LDS evaluation.

Run ``python -m stride_viz.data.models demo:tiny`` to build (or rebuild) a demo model by hand,
or ``python -m stride_viz train-model --pool fortunes+facts --preset tiny --out FOLDER`` to make
a checkpoint like the shipped one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch

from stride_viz.data.pools import Pool
from stride_viz.progress import StageTimer, no_progress
from stride_viz.data.tokenize import Encoded, encode, sequence_losses

__all__ = ["LoadedModel", "ModelError", "load_model", "train_demo_model", "train_lm", "encode_pool",
           "demo_model_dir", "data_home", "weights_hash", "DEMO_PRESETS", "resolve_device",
           "demo_settings", "fit_demo_lm", "train_tokenizer", "check_causal_decoder", "SHIPPED_DEMO_DIR",
           "model_spec_problem",
           "demo_model_source", "demo_model_available", "demo_training_steps", "training_rows"]

BOS = "<|endoftext|>"

# Demo model presets, trained on the 3,251 documents of fortunes+facts. tiny (the demo, shipped
# as a checkpoint): each fact document twice an epoch, 10 epochs, weight decay 0.1 and a
# tokenizer that treats a document's first word like any other; it says 28 of its 34 facts and
# STRIDE finds their documents (recall@10 0.98). Training longer makes it say more (31 at 12
# epochs, 32 at 16) but memorise the documents' answers, and STRIDE then finds them less often
# (recall@10 0.94 / 0.85; benchmarks/results/demo_quality.json). small: the earlier recipe,
# 329 s of one CPU core, trained on first use.
DEMO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, n_positions=128, vocab_size=2048,
                 epochs=10, steps=None, batch_size=32, lr=3e-3, max_length=96, fact_repeats=2,
                 weight_decay=0.1, prefix_space=True),
    "small": dict(n_layer=4, n_embd=128, n_head=4, n_positions=128, vocab_size=4096,
                  epochs=10, steps=None, batch_size=32, lr=2e-3, max_length=96, fact_repeats=1,
                  weight_decay=0.01, prefix_space=False),
}


# Demo checkpoints shipped with the package, one folder per preset, each exactly what
# `python -m stride_viz train-model --pool fortunes+facts --preset <preset> --out <folder>` wrote
# (README, "Models"). load_model("demo:<preset>") loads one instead of training when its
# MANIFEST says it was made by the preset's current recipe from the built-in pool, and checks
# its weights against the hash recorded there.
SHIPPED_DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
MANIFEST = "stride_viz_model.json"


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message says what to do instead."""


@dataclass
class LoadedModel:
    """A frozen causal LM ready for scoring (eval mode, no gradients) and its tokenizer."""

    model: Any        # transformers.PreTrainedModel
    tokenizer: Any    # transformers.PreTrainedTokenizerBase, pad token set
    spec: str
    hash: str
    device: torch.device


def data_home() -> Path:
    """Where stride_viz keeps built models: ``$STRIDE_VIZ_HOME`` or ``~/.stride_viz``."""
    return Path(os.environ.get("STRIDE_VIZ_HOME") or Path.home() / ".stride_viz").expanduser()


def demo_model_dir(preset: str = "tiny") -> Path:
    """Folder of the built-in demo model of ``preset`` (built on first use)."""
    _check_preset(preset)
    return data_home() / "models" / f"demo-{preset}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU; otherwise any torch device name."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"The 'device' parameter must be 'auto', 'cpu', 'cuda' or 'cuda:N'. "
                         f"Got {device!r} instead.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"Device '{device}' was asked for but this machine has no CUDA GPU; "
                         f"use device 'cpu' or 'auto'.")
    return dev


def weights_hash(model: torch.nn.Module) -> str:
    """First 16 hex digits of the sha256 of the state_dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # view as bytes: works for every dtype, including bfloat16 that numpy lacks
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")  # no copy
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- loading

def load_model(spec: str, device: str = "auto", trust_remote_code: bool = False,
               progress: Callable[..., None] = no_progress) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder, a hub id or ``demo[:tiny|:small]``.

    The model is put in eval mode on ``device`` with every parameter's requires_grad off;
    the tokenizer gets a pad token (its EOS, else BOS) when it has none.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"The model spec must be a folder, a Hugging Face hub id or 'demo'; got {spec!r}.")
    spec = spec.strip()
    dev = resolve_device(device)
    if spec == "demo" or spec.startswith("demo:"):
        preset = spec.partition(":")[2] or "tiny"
        _check_preset(preset)
        folder = demo_model_source(preset)
        if folder is not None:
            loaded = _load_from(str(folder), spec, dev, trust_remote_code, local_only=True)
            expected = _manifest(folder).get("weights_hash")
            if loaded.hash == expected:
                return loaded
            from stride_viz.integrity import warn
            warn(f"warning: the demo model in {folder} has the weights {loaded.hash}, not the {expected} "
                 f"its {MANIFEST} records (damaged?); training demo:{preset} again")
        from stride_viz.data.pools import load_pool
        folder = demo_model_dir(preset)
        train_demo_model(load_pool("fortunes+facts"), folder, preset=preset, progress=progress)
        return _load_from(str(folder), spec, dev, trust_remote_code, local_only=True)
    path = Path(spec).expanduser()
    problem = model_spec_problem(spec)
    if problem:
        raise ModelError(problem)
    if path.is_dir():
        return _load_from(str(path), spec, dev, trust_remote_code, local_only=True)
    return _load_from(spec, spec, dev, trust_remote_code, local_only=False)


def model_spec_problem(spec: str) -> Optional[str]:
    """Why a model spec that is not ``demo`` cannot be loaded, without loading anything: a
    local folder that is missing or holds no ``config.json``, or a string that is neither a
    path nor a hub id; None when it may load. Shared by :func:`load_model` and the job checks."""
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if path.exists() or looks_like_path:
        if not path.is_dir():
            return (f"Model folder '{spec}' does not exist; give a folder written by "
                    f"save_pretrained (with config.json), a hub id, or 'demo'.")
        if not (path / "config.json").exists():
            return (f"Folder '{spec}' has no config.json, so it holds no saved model; give a folder "
                    f"written by model.save_pretrained(...) and tokenizer.save_pretrained(...).")
        return None
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec):
        return (f"'{spec}' is neither an existing folder nor a valid Hugging Face hub id "
                f"(like 'gpt2' or 'org/name'); check the spelling.")
    return None


def check_causal_decoder(config: Any, spec: str = "") -> None:
    """Refuse (ModelError) a configuration that is not a decoder-only causal LM: no
    ``model_type``, an encoder-decoder (T5, BART, ...), or a bidirectional encoder family
    (BERT, RoBERTa, ...) that transformers would wrap as a causal LM although it was not
    trained as one (accepted only with ``is_decoder=True``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    where = f" in '{spec}'" if spec else ""
    name = type(config).__name__
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ModelError(f"The model configuration{where} ({name}) has no 'model_type', so its "
                         f"architecture is unknown; save the model with save_pretrained.")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"The model{where} ({name}) is an encoder-decoder, not a causal language "
                         f"model; STRIDE needs a decoder-only causal LM (GPT-2, Llama, Qwen, ...).")
    if (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
            and not getattr(config, "causal", False)):
        raise ModelError(f"The model{where} ({name}) is a bidirectional encoder (a masked LM), not a "
                         f"causal language model; STRIDE needs a decoder-only causal LM (GPT-2, Llama, "
                         f"Qwen, ...).")


def _load_from(source: str, spec: str, dev: torch.device, trust_remote_code: bool,
               local_only: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=trust_remote_code)
    if _config_lacks_model_type(Path(source) / "config.json"):
        raise ModelError(f"The config.json in '{spec}' has no 'model_type', so its architecture is "
                         f"unknown; save the model with save_pretrained.")
    try:
        # the local cache first: instant when the hub id was downloaded before
        config = AutoConfig.from_pretrained(source, local_files_only=True, **kw)
        local_only = True
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelError(f"'{spec}' needs the custom code of its repository; pass "
                             f"trust_remote_code=True (--trust-remote-code) if you trust that code.") from None
        if local_only:
            raise ModelError(f"Could not read the model configuration in '{spec}' ({_short(e)}); "
                             f"save the model again with save_pretrained.") from None
        if not _hub_reachable():
            raise ModelError(f"'{spec}' is not a local folder and the Hugging Face hub cannot be reached "
                             f"from here (offline); download the model elsewhere, save it with "
                             f"save_pretrained and pass that local folder instead.") from None
        try:
            config = AutoConfig.from_pretrained(source, **kw)
        except (OSError, ValueError) as e2:
            raise ModelError(f"Could not load '{spec}' from the Hugging Face hub ({_short(e2)}); check "
                             f"the id, or pass a local folder written by save_pretrained.") from None
    check_causal_decoder(config, spec)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=local_only,
                                                           output_loading_info=True, **kw)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
            raise ModelError(f"The model in '{spec}' ({type(config).__name__}) is not a causal language "
                             f"model; STRIDE needs one loadable with AutoModelForCausalLM "
                             f"(GPT-2, Llama, Qwen, ...).") from None
        raise ModelError(f"Could not load the model in '{spec}' ({_short(e)}).") from None
    except OSError as e:
        raise ModelError(f"Could not load the weights of '{spec}' ({_short(e)}); the folder needs "
                         f"model.safetensors or pytorch_model.bin next to config.json.") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        # e.g. an encoder (BERT) that transformers would wrap in a fresh, untrained LM head
        raise ModelError(f"The checkpoint in '{spec}' ({type(config).__name__}) lacks the weights "
                         f"{missing[:3]}{' ...' if len(missing) > 3 else ''}: it is not a causal language "
                         f"model, or was saved without its language-model head; STRIDE needs a complete "
                         f"causal LM (GPT-2, Llama, Qwen, ...).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, **kw)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"'{spec}' has a model but no usable tokenizer ({_short(e)}); save the "
                         f"tokenizer into the same folder with tokenizer.save_pretrained.") from None
    _set_pad_token(tokenizer)
    model.eval()
    model.requires_grad_(False)
    digest = weights_hash(model)  # before any cast, so the hash does not depend on the device
    if dev.type == "cpu" and next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        model.float()  # half precision is slow or unsupported for many CPU kernels
    model.to(dev)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, spec, digest, dev)


def _config_lacks_model_type(config_file: Path) -> bool:
    try:
        return not json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False  # no such file, or not a JSON object: AutoConfig says what is wrong


def _set_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        for candidate in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token):
            if candidate is not None:
                tokenizer.pad_token = candidate
                return
        # no special token at all: pad with id 0 (padded positions are masked anyway)
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check, so that an offline machine fails in seconds instead of retrying
    for half a minute inside huggingface_hub."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] + ("..." if len(text) > 200 else "")


# ----------------------------------------------------------------------------- training

def encode_pool(tokenizer: Any, pool: Pool, max_length: int) -> Encoded:
    """The pool as training tensors (see :func:`stride_viz.data.tokenize.encode`)."""
    return encode(tokenizer, list(pool.prompts), list(pool.completions), max_length)


def train_lm(model: Any, tokenizer: Any, pool: Pool | Encoded, *, epochs: Optional[float] = None,
             steps: Optional[int] = None, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
             max_length: int = 128, weight_decay: float = 0.01, warmup_fraction: float = 0.05,
             progress: Callable[..., None] = no_progress, stage: str = "train-model") -> Any:
    """Train ``model`` in place on ``pool`` and return it (eval mode, requires_grad off).

    Loss: per example, the mean next-token cross-entropy over its completion tokens (the
    whole text, after a prepended BOS, for plain documents); averaged over the batch.
    Optimiser: AdamW (betas 0.9/0.95), linear warm-up over ``warmup_fraction`` of the steps,
    then cosine decay to 10% of ``lr``. Give ``epochs`` (may be fractional) or ``steps``
    (default one epoch). Batches are drawn from a generator seeded with ``seed``, and the
    global RNG is forked and seeded too (dropout), so the same inputs give the same weights.
    ``pool`` may be a pre-encoded :class:`Encoded` (saves tokenising again on repeated calls).
    """
    from transformers import get_cosine_schedule_with_warmup
    from stride_viz.method.allocator import keep_freed_memory

    keep_freed_memory()          # the same large tensors every step: keep them in the heap

    if epochs is not None and steps is not None:
        raise ValueError("Give train_lm either 'epochs' or 'steps', not both.")
    data = pool if isinstance(pool, Encoded) else encode_pool(tokenizer, pool, max_length)
    n = len(data)
    if n == 0:
        raise ValueError("train_lm needs at least one example; the pool is empty.")
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    batch_size = min(batch_size, n)
    per_epoch = math.ceil(n / batch_size)
    if steps is None:
        epochs = 1.0 if epochs is None else epochs
        _check_positive("epochs", epochs)
        steps = max(1, round(epochs * per_epoch))
    _check_positive("steps", steps, integer=True)

    device = next(model.parameters()).device
    data = data.to(device)
    gen = torch.Generator().manual_seed(seed)
    lengths = data.attention_mask.sum(1).cpu()
    batches = [b for _ in range(math.ceil(steps / per_epoch))
               for b in _epoch_batches(lengths, batch_size, gen)][:steps]
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, round(warmup_fraction * steps), steps, num_cycles=0.45)
    timer = StageTimer(stage, steps, progress)
    devices = [device.index or 0] if device.type == "cuda" else []
    model.requires_grad_(True)
    model.train()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for step in range(steps):
                batch = data.select(batches[step].to(device))
                width = int(batch.attention_mask.sum(1).max())  # trim the shared padding
                ids, att, mask = (t[:, :width] for t in (batch.input_ids, batch.attention_mask, batch.loss_mask))
                logits = model(input_ids=ids, attention_mask=att).logits
                loss = sequence_losses(logits, ids, mask).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                timer.update(step + 1, f"step {step + 1}/{steps}, loss {loss.item():.3f} nats")
    finally:
        model.eval()
        model.requires_grad_(False)
    timer.finish(f"{steps} steps")
    return model


def _epoch_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches (index tensors) in random order, each drawn from examples of
    similar length: a random permutation is cut into windows of 16 batches, each window is
    sorted by length before being cut into batches. This halves the padding of short
    documents at no cost to randomness worth having."""
    n = len(lengths)
    perm = torch.randperm(n, generator=gen)
    window = 16 * batch_size
    batches = []
    for start in range(0, n, window):
        chunk = perm[start:start + window]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def _check_positive(name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"The '{name}' parameter of train_lm must be {kind}. Got {value!r} instead.")


def _check_preset(preset: str) -> None:
    if preset not in DEMO_PRESETS:
        raise ModelError(f"Unknown demo preset {preset!r}; use one of "
                         f"{', '.join('demo:' + p for p in DEMO_PRESETS)}.")


def train_tokenizer(texts: list[str], vocab_size: int, prefix_space: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with ``<|endoftext|>`` as BOS, EOS and
    pad, wrapped as a ``PreTrainedTokenizerFast``. ``prefix_space``: a text that does not start
    with a space is encoded as if it did, so a word at the start of a document is the same
    token as in the middle of a sentence ("Mount Zaraketh is ..." and "... is Mount")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   model_max_length=1 << 30)


def demo_settings(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The settings of a demo preset with ``overrides`` applied (n_layer, n_embd, n_head,
    n_positions, vocab_size, epochs, steps, batch_size, lr, max_length, fact_repeats: how many
    times an epoch shows each planted-fact document, no effect on a pool without facts;
    weight_decay: AdamW's, on the matrices; prefix_space: see :func:`train_tokenizer`); giving
    ``steps`` replaces ``epochs``."""
    _check_preset(preset)
    unknown = sorted(set(overrides) - set(DEMO_PRESETS[preset]))
    if unknown:
        raise ValueError(f"Unknown demo model setting(s) {unknown}; allowed: {sorted(DEMO_PRESETS[preset])}.")
    cfg = {**DEMO_PRESETS[preset], **overrides}
    if cfg["steps"] is not None:
        cfg["epochs"] = None
    cfg["max_length"] = min(cfg["max_length"], cfg["n_positions"])
    r = cfg["fact_repeats"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"The 'fact_repeats' demo model setting must be a positive integer. Got {r!r} instead.")
    return cfg


def fit_demo_lm(pool: Pool | Encoded, tokenizer: Any, preset: str = "tiny", seed: int = 0,
                progress: Callable[..., None] = no_progress, **overrides: Any) -> Any:
    """A GPT-2 of the preset's shape, initialised from ``seed`` and trained from scratch on
    ``pool`` with :func:`train_lm`, in memory (eval mode, no gradients). With a fixed
    ``tokenizer`` this is the retraining step of the LDS evaluation: same seed and same
    pool give the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = demo_settings(preset, **overrides)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg["n_positions"], n_embd=cfg["n_embd"],
                        n_layer=cfg["n_layer"], n_head=cfg["n_head"], bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        # no dropout: it did not help the demo say its facts (demo_quality.json)
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights
        model = GPT2LMHeadModel(config)
    if cfg["fact_repeats"] > 1 and (isinstance(pool, Encoded) or pool.facts):
        if isinstance(pool, Encoded):
            raise ValueError("The 'fact_repeats' demo model setting needs the pool itself, not its encoded "
                             "tensors (they do not say which rows state a fact); use fact_repeats=1.")
        pool = encode_pool(tokenizer, pool, cfg["max_length"]).select(training_rows(pool, cfg["fact_repeats"]))
    return train_lm(model, tokenizer, pool, epochs=cfg["epochs"], steps=cfg["steps"],
                    batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, max_length=cfg["max_length"],
                    weight_decay=cfg["weight_decay"], progress=progress)


def training_rows(pool: Pool, fact_repeats: int = 1) -> list[int]:
    """Pool rows of one epoch of the demo model's training: every document once, and each
    document that states a planted fact ``fact_repeats - 1`` more times. The model sees no
    text outside the pool, only its facts more often."""
    facts = sorted({pool.index_of(s) for f in pool.facts for s in f.source_ids}) if fact_repeats > 1 else []
    return list(range(len(pool))) + facts * (fact_repeats - 1)


def _manifest(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _made_by_recipe(folder: Path, preset: str) -> bool:
    """Whether ``folder`` holds a demo model trained by ``preset``'s current recipe (seed 0)
    from the current built-in pool, as its manifest records."""
    from stride_viz.data.pools import load_pool
    m = _manifest(folder)
    return (bool(m) and (Path(folder) / "config.json").exists() and m.get("preset") == preset
            and m.get("seed") == 0 and m.get("settings") == demo_settings(preset)
            and m.get("pool_hash") == load_pool("fortunes+facts").hash)


def demo_model_source(preset: str = "tiny") -> Optional[Path]:
    """The folder ``load_model("demo:<preset>")`` loads without training: the checkpoint shipped
    with the package, else the one built before under :func:`demo_model_dir`, each only when
    made by the preset's current recipe; None when the model has to be trained first."""
    _check_preset(preset)
    for folder in (SHIPPED_DEMO_DIR / preset, demo_model_dir(preset)):
        if _made_by_recipe(folder, preset):
            return folder
    return None


def demo_model_available(preset: str = "tiny") -> bool:
    """Whether ``demo:<preset>`` loads in seconds (True) or is trained first (False)."""
    return demo_model_source(preset) is not None


def demo_training_steps(pool: Pool, preset: str = "tiny", **overrides: Any) -> int:
    """Optimisation steps :func:`train_demo_model` takes on ``pool`` with these settings."""
    cfg = demo_settings(preset, **overrides)
    if cfg["steps"] is not None:
        return int(cfg["steps"])
    rows = len(training_rows(pool, cfg["fact_repeats"]))
    return max(1, round(cfg["epochs"] * math.ceil(rows / max(1, min(cfg["batch_size"], rows)))))


def train_demo_model(pool: Pool, out_dir: Path, preset: str = "tiny", seed: int = 0,
                     progress: Callable[..., None] = no_progress, **overrides: Any) -> Path:
    """Train a byte-level BPE tokenizer and a GPT-2 from scratch on ``pool``; save both to
    ``out_dir`` (loadable with ``from_pretrained``), with a manifest (``stride_viz_model.json``:
    the settings, seed, pool hash and weights hash), and return it.

    ``overrides`` replace preset values (see :func:`demo_settings`), e.g. ``steps=5`` for a
    quick test. The folder is written atomically: a killed run leaves no half-written model.
    """
    import transformers

    cfg = demo_settings(preset, **overrides)
    out_dir = Path(out_dir)
    t0 = time.monotonic()
    progress("train-model", 0.0, None, "training the tokenizer")
    # trained on what the model is trained on: with the facts repeated, each invented answer
    # word ("Quessit") becomes one token instead of four, which the model can learn to say
    tokenizer = train_tokenizer([pool.text(i) for i in training_rows(pool, cfg["fact_repeats"])],
                                cfg["vocab_size"], cfg["prefix_space"])
    model = fit_demo_lm(pool, tokenizer, preset, seed, progress, **overrides)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"preset": preset, "settings": cfg, "seed": seed, "pool": pool.name, "pool_hash": pool.hash,
                    "n_pool": len(pool), "weights_hash": weights_hash(model),
                    "train_seconds": round(time.monotonic() - t0, 1),
                    "command": f"python -m stride_viz train-model --pool {pool.name} --preset {preset} "
                               f"--seed {seed} --out <folder>" + (f" (overrides {overrides})" if overrides else ""),
                    "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.chmod(0o755)   # mkdtemp's 0700 would hide a shared or shipped model from other users
        for f in tmp.iterdir():
            f.chmod(0o644)   # and so would the 0600 that model.safetensors is written with
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    progress("train-model", 1.0, 0.0, f"demo model '{preset}' trained in {time.monotonic() - t0:.0f} s")
    return out_dir


if __name__ == "__main__":  # python -m stride_viz.data.models demo:tiny
    import sys

    from stride_viz.data.pools import load_pool
    from stride_viz.progress import print_progress

    name = sys.argv[1] if len(sys.argv) > 1 else "demo:tiny"
    chosen = name.partition(":")[2] or "tiny"
    print(train_demo_model(load_pool("fortunes+facts"), demo_model_dir(chosen), chosen, progress=print_progress))
