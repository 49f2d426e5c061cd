"""The checks the Launch page runs before it queues a job, Streamlit-free so they are tested
without a browser.

Everything that can be known before the job starts is checked here: the model folder holds
the configuration of a causal language model (read from config.json alone: fast, no weights),
the pool parses and is large enough for the subsets, every setting is in range. Messages name
the form's fields ("subsets", "per example") and the file the user gave (an upload's own name),
never a CLI flag or a path on the server. An uploaded pool is stored under
``uploads/<content hash>/<its name>`` and deleted again when nothing is launched with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from stride_viz.config import ConfigError, FitConfig, RecoveryConfig
from stride_viz.data.pools import PoolError, builtin_pools, load_pool
from stride_viz.jobs import Job, JobError

__all__ = ["FORM_PREFIX", "setting_label", "form_message", "read_settings", "check_model_config",
           "check_pool", "save_upload", "discard_upload", "is_input_error", "form_values"]

FORM_PREFIX = {FitConfig: "fit", RecoveryConfig: "rec"}   # widget key = f"{prefix}_{field}"
# failures that running the same job again cannot fix: the input has to change
_INPUT_ERRORS = ("ConfigError", "RunMismatch", "PoolError", "ModelError", "QueryError", "JobError")
_TRANSIENT = ("cannot be reached",)                        # an offline hub may be back later


def setting_label(name: str) -> str:
    """The form's label of a FitConfig / RecoveryConfig field."""
    return name.replace("_", " ")


def form_message(message: str, cls: type) -> str:
    """A ConfigError message in the form's words: "The 'per_example' parameter of FitConfig
    must be at most 'subsets' (16)" -> "“per example” must be at most “subsets” (16)"."""
    names = {f.name for f in dataclasses.fields(cls)}
    message = re.sub(r"The '(\w+)' parameter of \w+", lambda m: f"“{setting_label(m[1])}”", message)
    return re.sub(r"'(\w+)'", lambda m: f"“{setting_label(m[1])}”" if m[1] in names else m[0], message)


def read_settings(cls: type, value_of: Callable[[str], Any]) -> tuple[dict, dict[str, str]]:
    """The settings typed in the form, all checked: every bad one is reported, not only the first.

    value_of(field name) -> the widget's value (optional integers arrive as text). Returns
    (the settings that differ from the defaults, {field name: message} for every bad one).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    data, errors = {}, {}
    for f in dataclasses.fields(cls):
        v = value_of(f.name)
        if f.default is None:  # optional integers are typed as text
            text = str(v or "").strip()
            try:
                v = int(text) if text else None
            except ValueError:
                errors[f.name] = f"“{setting_label(f.name)}” must be a whole number or empty. Got {text!r} instead."
                continue
        if v != f.default:
            data[f.name] = v
    # the dataclass stops at the first bad field: take it out and check the rest again (with
    # the other typed values in place, so checks between fields such as per example <= subsets
    # see what was typed)
    valid = dict(data)
    while valid:
        try:
            cls(**valid)
            break
        except ConfigError as e:
            named = [n for n in re.findall(r"'(\w+)'", str(e)) if n in names]
            culprit = next((n for n in named if n in valid), None)
            errors.setdefault(named[0] if named else culprit or next(iter(valid)), form_message(str(e), cls))
            if culprit is None:
                break
            del valid[culprit]
    if cls is FitConfig and not errors and data.get("device", "auto") != "auto":
        from stride_viz.data.models import ModelError, resolve_device
        try:
            resolve_device(data["device"])
        except ModelError as e:
            errors["device"] = str(e)
    return data, errors


def check_model_config(spec: str) -> None:
    """Refuse a model whose config.json does not describe a causal language model.

    spec: a model folder (as check_model_spec returns it), a hub id (checked only when it is in
    the local Hugging Face cache: otherwise the job downloads and checks it) or ``demo:...``.
    Reads the configuration only, and applies load_model's own check of it
    (:func:`stride_viz.data.models.check_causal_decoder`). Raises JobError.
    """
    if spec == "demo" or spec.startswith("demo:"):
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from stride_viz.data.models import ModelError, check_causal_decoder
    folder = Path(spec)
    where = f"Model folder '{spec}'" if folder.is_dir() else f"Model '{spec}'"
    if folder.is_dir():
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise JobError(f"{where}: config.json cannot be read ({e}); save the model again with "
                           f"save_pretrained.") from None
        if not isinstance(raw, dict) or not raw.get("model_type"):
            # AutoConfig would guess the architecture from the folder's name
            raise JobError(f"{where}: config.json has no 'model_type', so transformers cannot tell "
                           f"which model it is; save the model with save_pretrained (it writes one).")
    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        if not folder.is_dir():
            return  # a hub id that is not cached: the job fetches it
        if "trust_remote_code" in str(e):
            raise JobError(f"{where} needs custom code (trust_remote_code), which the dashboard does "
                           f"not run; use a model transformers knows.") from None
        raise JobError(f"{where}: config.json is not a configuration transformers can read "
                       f"({str(e).splitlines()[0][:200]}).") from None
    try:
        check_causal_decoder(config, spec)
    except ModelError as e:
        raise JobError(str(e)) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:   # e.g. a vision model
        raise JobError(f"{where} is a '{config.model_type}' model, which has no causal language model "
                       f"head in transformers; STRIDE needs one that AutoModelForCausalLM loads "
                       f"(GPT-2, Llama, Qwen, ...).")


def check_pool(spec: str, limit: Optional[int], fit: Optional[FitConfig], shown: Optional[str] = None) -> int:
    """Parse the pool and check that it can fill the subsets; returns its number of examples.

    shown: the name the user knows the file by (an upload's own name): messages use it instead
    of the path on the server. fit: the settings whose subsets the pool must fill (None: only
    parse). Raises PoolError.
    """
    try:
        n = len(load_pool(spec, limit=limit))
    except PoolError as e:
        message = str(e)
        if shown is not None and spec not in builtin_pools():
            message = message.replace(str(Path(spec).resolve()), shown).replace(str(spec), shown)
        raise PoolError(message) from None
    what = f"'{shown or spec}'"
    first = " (with “Use only the first N examples”)" if limit else ""
    if n < 2:
        raise PoolError(f"The pool {what} has {n} example{first}; STRIDE needs at least a few dozen.")
    if fit is not None:
        need = -(-fit.subsets // fit.per_example)
        if n < need:
            raise PoolError(
                f"The pool {what} has {n} examples{first}, fewer than the {need} that “subsets” = "
                f"{fit.subsets} with “per example” = {fit.per_example} need (every subset must get "
                f"examples). Lower “subsets” under Advanced: STRIDE settings to at most "
                f"{n * fit.per_example}, or use a larger pool.")
    return n


def save_upload(folder: str | Path, name: str, data: bytes) -> tuple[Path, bool]:
    """Store an uploaded file as ``folder/<sha256[:16]>/<its own name>`` (the name keeps its
    extension, which tells load_pool the format). Returns (path, whether it was written now)."""
    base = Path(str(name).replace("\\", "/")).name
    if base in ("", ".", ".."):
        base = "upload"
    path = Path(folder) / hashlib.sha256(data).hexdigest()[:16] / base
    if path.exists():
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, True


def discard_upload(path: str | Path) -> None:
    """Delete an upload written by save_upload (and its folder when that is left empty)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def is_input_error(job: Job) -> bool:
    """A failed job whose error is about its input (settings, model, pool, query): resuming it
    would fail the same way, the input has to change."""
    error = job.error or ""
    return (job.state == "failed" and error.split(":", 1)[0] in _INPUT_ERRORS
            and not any(t in error for t in _TRANSIENT))


def form_values(params: dict, uploads: str | Path) -> dict[str, Any]:
    """The Launch form's widget values (by key) that relaunch an ``attribute`` job's params.

    An uploaded pool cannot be put back into the file picker: the form asks for it again.
    """
    values: dict[str, Any] = {}
    model = str(params.get("model", ""))
    if model.startswith("demo"):
        values.update(launch_model_kind="Built-in demo model", launch_model_preset=model.partition(":")[2] or "tiny")
    elif Path(model).is_absolute():
        values.update(launch_model_kind="Local folder", launch_model_path=model)
    else:
        values.update(launch_model_kind="Hugging Face hub id", launch_model_hub=model)
    pool = str(params.get("pool", ""))
    if pool in builtin_pools():
        values.update(launch_pool_kind="Built-in", launch_pool_builtin=pool)
    elif Path(uploads).resolve() in Path(pool).resolve().parents:
        values.update(launch_pool_kind="Upload a file")
    else:
        values.update(launch_pool_kind="Path on this machine", launch_pool_path=pool)
    values["launch_pool_limit"] = int(params.get("pool_limit") or 0)
    query = (params.get("queries") or [{}])[0]
    values.update(launch_prompt=query.get("prompt", ""), launch_completion=query.get("completion") or "")
    for cls, key in ((FitConfig, "fit"), (RecoveryConfig, "recovery")):
        given = params.get(key) or {}
        for f in dataclasses.fields(cls):
            v = given.get(f.name, f.default)
            if f.default is None:                       # typed as text
                v = "" if v is None else str(v)
            elif not isinstance(f.default, str):        # a number input keeps the field's type
                v = type(f.default)(v)
            values[f"{FORM_PREFIX[cls]}_{f.name}"] = v
    return values
