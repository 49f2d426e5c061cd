"""Launch: pick a model, a training pool and a test prompt, and start an attribution job.

Every field is checked when Launch is pressed (stride_viz.app.launch: the model folder holds a
causal LM, the pool fills the subsets, every setting is in range); a problem is reported under
its field and nothing is started (a rejected upload is deleted). The job itself runs in a
background worker (see the Runs page).
"""
from __future__ import annotations

import dataclasses

import streamlit as st

from stride_viz.app import launch, ui
from stride_viz.config import CHOICES, FitConfig, RecoveryConfig, help_of
from stride_viz.jobs import JobError
from stride_viz.jobs.kinds import check_model_spec, check_pool_spec
from stride_viz.data.models import DEMO_PRESETS, data_home
from stride_viz.data.pools import PoolError, builtin_pools

ui.page_setup("Launch")
# "Edit settings" of a failed job (Runs page): its settings fill the form below
prefill = st.session_state.pop("launch_prefill", None)
if prefill:
    st.session_state.update(prefill["values"], launch_errors={}, launch_job_id=None, launch_prefilled=prefill)
st.title("Launch an attribution")
st.markdown("Choose a **model**, the **training pool** to attribute to, and the **test prompt** whose "
            "completion you want explained. Fitting the STRIDE operators is done once per model, pool "
            "and settings; later prompts on the same combination reuse them and finish in seconds.")

with st.container(border=True):
    st.markdown("#### Quick start: the built-in demo")
    st.caption("A small GPT-2 trained on the `fortunes+facts` pool (quotations plus invented facts with "
               "known sources), STRIDE with default settings, and a few planted-fact queries explained.")
    demo_id = ui.launch_demo_button("launch_demo")
    if demo_id is not None:
        ui.live_job(demo_id, key="launch_demo_job")

errors: dict[str, str] = st.session_state.setdefault("launch_errors", {})
if st.session_state.get("launch_prefilled"):
    was = st.session_state["launch_prefilled"]
    st.info(f"The settings of job #{was['job']} are filled in below. It failed with: {ui.md(was['error'])} "
            f"Change what the error names and press **Launch**"
            + (" (upload the pool file again)." if st.session_state.get("launch_pool_kind") == "Upload a file"
               else "."), icon=":material/edit:")


def field_error(name: str) -> None:
    if name in errors:
        st.error(ui.md(errors[name]), icon=":material/error:")


# ----------------------------------------------------------------------------- model
st.markdown("#### 1. Model")
model_kind = st.radio("Model source", ["Built-in demo model", "Local folder", "Hugging Face hub id"],
                      key="launch_model_kind", horizontal=True,
                      help="A folder written by save_pretrained (config.json + weights + tokenizer), or a "
                           "hub id that is in your Hugging Face cache or reachable.")
if model_kind == "Built-in demo model":
    st.selectbox("Demo preset", list(DEMO_PRESETS), key="launch_model_preset",
                 help="tiny: 2 layers, trains in about a minute; small: 4 layers, a few minutes.")
elif model_kind == "Local folder":
    st.text_input("Model folder", key="launch_model_path", placeholder="/path/to/model",
                  help="A folder with config.json, the weights and the tokenizer files.")
else:
    st.text_input("Hub id", key="launch_model_hub", placeholder="gpt2 or org/name")
field_error("model")

# ----------------------------------------------------------------------------- pool
st.markdown("#### 2. Training pool")
pool_kind = st.radio("Pool source", ["Built-in", "Upload a file", "Path on this machine"], key="launch_pool_kind",
                     horizontal=True)
if pool_kind == "Built-in":
    st.selectbox("Built-in pool", builtin_pools(), index=1, key="launch_pool_builtin",
                 help="fortunes: ~11k quotations; fortunes+facts: 3,000 of them plus invented facts "
                      "whose source documents are known (a sanity check of the attribution).")
elif pool_kind == "Upload a file":
    st.file_uploader("Pool file", type=["jsonl", "ndjson", "json", "csv", "txt"], key="launch_pool_upload",
                     help="JSONL/CSV with a `text` column, or `prompt` and `completion` columns (optional "
                          "`id`); TXT: one document per blank-line-separated paragraph.")
else:
    st.text_input("Pool path", key="launch_pool_path", placeholder="/data/train.jsonl",
                  help="A JSONL, CSV or TXT file, or a folder written by datasets' save_to_disk.")
st.number_input("Use only the first N examples (0 = all)", min_value=0, value=0, step=100,
                key="launch_pool_limit", help="For a quick trial on a large pool.")
field_error("pool")

# ----------------------------------------------------------------------------- query
st.markdown("#### 3. Test prompt")
st.text_area("Prompt", key="launch_prompt", height=80, placeholder="The capital of Vorlandia is",
             help="The text the model is given.")
field_error("prompt")
st.text_area("Completion to explain (optional)", key="launch_completion", height=68,
             placeholder=" Quessit.",
             help="The continuation whose likelihood is explained. Leave empty to let the model "
                  "complete the prompt (greedy) and explain its own answer. Start it with a space "
                  "if the prompt does not end with one.")
field_error("queries")

# ----------------------------------------------------------------------------- settings
_CHOICES = {**CHOICES, "device": ("auto", "cpu", "cuda")}


def config_inputs(cls, prefix: str) -> None:
    """One input per dataclass field (key ``<prefix>_<field>``), with the field's help text."""
    cols = st.columns(3)
    for i, f in enumerate(dataclasses.fields(cls)):
        key, label, help_ = f"{prefix}_{f.name}", launch.setting_label(f.name), help_of(cls, f.name)
        with cols[i % 3]:
            if f.name in _CHOICES:
                options = list(dict.fromkeys([*_CHOICES[f.name], f.default]))  # the default is always one
                st.selectbox(label, options, index=options.index(f.default), key=key, help=help_)
            elif isinstance(f.default, bool):
                st.checkbox(label, value=f.default, key=key, help=help_)
            elif f.default is None or isinstance(f.default, str):
                st.text_input(label + (" (empty = default)" if f.default is None else ""), key=key,
                              help=help_, value=f.default or "")
            elif isinstance(f.default, float):
                st.number_input(label, value=f.default, key=key, help=help_, format="%g")
            else:
                st.number_input(label, value=int(f.default), step=1, key=key, help=help_)
            field_error(f"{prefix}_{f.name}")


with st.expander("Advanced: STRIDE settings", expanded=any(k.startswith(("fit_", "rec_")) for k in errors)):
    st.markdown("**Operator fit** (changing any of these means a new fit)")
    config_inputs(FitConfig, "fit")
    st.markdown("**Sparse recovery** (cheap: no refit needed)")
    config_inputs(RecoveryConfig, "rec")


# ----------------------------------------------------------------------------- validate + launch
_SECTIONS = {"model": "1. Model", "pool": "2. Training pool", "prompt": "3. Test prompt",
             "queries": "3. Test prompt"}


def _settings(found: dict) -> dict[str, dict]:
    """The settings typed under Advanced that differ from the defaults, by form prefix; every
    bad one is filed under its field."""
    out = {}
    for cls, prefix in launch.FORM_PREFIX.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        out[prefix], bad = launch.read_settings(
            cls, lambda name, p=prefix: st.session_state.get(f"{p}_{name}", defaults[name]))
        found.update({f"{prefix}_{name}": message for name, message in bad.items()})
    return out


def validate_and_launch() -> None:
    s = st.session_state
    found: dict[str, str] = {}
    settings = _settings(found)
    fit = None if any(k.startswith("fit_") for k in found) else FitConfig(**settings["fit"])
    model = None
    try:
        kind = s["launch_model_kind"]
        spec = (f"demo:{s['launch_model_preset']}" if kind == "Built-in demo model"
                else s.get("launch_model_path", "") if kind == "Local folder" else s.get("launch_model_hub", ""))
        model = check_model_spec(spec)
        launch.check_model_config(model)        # config.json alone: a causal LM, in a second
    except JobError as e:
        found["model"] = str(e)
    pool, upload = None, None                   # upload: a file written now, deleted if rejected
    limit = int(s["launch_pool_limit"]) or None
    try:
        kind, shown = s["launch_pool_kind"], None
        if kind == "Built-in":
            pool = s["launch_pool_builtin"]
        elif kind == "Upload a file":
            if s.get("launch_pool_upload") is None:
                raise JobError("Choose a pool file to upload (JSONL, CSV or TXT).")
            shown = s["launch_pool_upload"].name
            path, created = launch.save_upload(data_home() / "uploads", shown, s["launch_pool_upload"].getvalue())
            pool, upload = str(path), path if created else None
        else:
            pool = check_pool_spec(s.get("launch_pool_path", ""))
        launch.check_pool(pool, limit, fit, shown=shown)   # parses it: its errors show here
    except (JobError, PoolError) as e:
        found["pool"] = str(e)
    prompt = s.get("launch_prompt", "")
    if not prompt.strip():
        found["prompt"] = "Type the prompt whose completion you want explained."
    completion = s.get("launch_completion", "") or None
    if not found:
        params = {"model": model, "pool": pool, "pool_limit": limit, "fit": settings["fit"],
                  "recovery": settings["rec"], "queries": [{"prompt": prompt, "completion": completion}]}
        try:
            s["launch_job_id"] = ui.executor().submit("attribute", params)
            s.pop("launch_prefilled", None)
            upload = None                       # kept: the job reads it
        except JobError as e:
            found["queries"] = str(e)
    if upload is not None:
        launch.discard_upload(upload)
    s["launch_errors"] = found


st.button("Launch", key="launch_submit", type="primary", on_click=validate_and_launch)
if errors:
    where = dict.fromkeys(_SECTIONS.get(k) or f"Advanced: STRIDE settings ▸ {launch.setting_label(k.split('_', 1)[1])}"
                          for k in errors)
    st.error(f"Nothing was launched: fix the fields marked above ({'; '.join(where)}).")
elif st.session_state.get("launch_job_id") is not None:
    st.success(f"Job #{st.session_state['launch_job_id']} launched. It runs in the background; follow it "
               "here or on the Runs page.")
    ui.live_job(st.session_state["launch_job_id"], key="launch_job")
