"""Explore: one finished run and one of its queries, as linked interactive charts.

Reads the run directory only (no model is loaded here; a prompt typed in the "Explain" box
is queued for the run's explainer process, which keeps the model loaded). The URL carries the
run, the query and the selected example (?run=...&query=...&example=...), so a view can be
shared as a link.
Selecting an example in any chart or in the table highlights it everywhere.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import streamlit as st

from stride_viz.app import plots, sparsity, ui
from stride_viz.config import RecoveryConfig
from stride_viz.storage import RunStore
from stride_viz.jobs import JobError, explainer, query_id_for
from stride_viz.jobs.kinds import check_new_prompt, stage_position
from stride_viz.app.report import build_report, csv_text, fact_sources, query_snippet, ranks_of, top_table

ui.page_setup("Explore")
st.title("Explore an attribution")

all_runs = [r for r in ui.runs() if r.query_ids]
if not all_runs:
    st.info("No finished run yet. Launch the built-in demo from the Home or Launch page; it appears "
            "here when its first query is explained.")
    st.page_link("pages/1_Launch.py", label="Go to Launch", icon=":material/rocket_launch:")
    st.stop()

# a link naming a token that this page did not write itself opens the token view on it
_linked_token = st.query_params.get("token") not in (None, st.session_state.get("_url_seen", {}).get("token"))
ui.init_from_url({"run": "explore_run", "query": "explore_query", "example": "explore_example",
                  "token": "explore_token"})
by_name = {r.name: r for r in all_runs}
goto = st.session_state.pop("_explore_goto", None)   # a prompt just explained: show it
if goto and goto["run"] in by_name:
    st.session_state.update(explore_run=goto["run"], explore_query=goto["query"], explore_example="")
ui.keep_linked_run("explore_run", by_name, all_runs[0].name)

# ----------------------------------------------------------------------------- selectors
with st.sidebar:
    st.selectbox("Run", list(by_name), key="explore_run", format_func=lambda n: by_name[n].label(),
                 help="A model + pool + settings whose operators are fitted.")
run = ui.run_info(str(by_name[st.session_state["explore_run"]].path))
run_dir = str(run.path)
if st.session_state.get("explore_query") not in run.query_ids:
    st.session_state["explore_query"] = run.query_ids[0]
queries = ui.query_infos(run_dir)
with st.sidebar:
    st.selectbox("Query", run.query_ids, key="explore_query", help="An explained prompt of this run.",
                 format_func=lambda i: query_snippet(queries[i], 60) if i in queries else i)
q = ui.query_view(run_dir, st.session_state["explore_query"])
pool = ui.pool_rows(run_dir)
ids = pool["id"].tolist()
texts = pool["text"].tolist()
row_of = {e: i for i, e in enumerate(ids)}
sources = fact_sources(run_dir, q.info)
marked = {row_of[s] for s in sources if s in row_of}

# examples ranked by score (non-zero first), then the rest: every example can be selected
ranked = [int(i) for i in top_table(pool, q.scores)["row"]]
rest = sorted(set(range(len(ids))) - set(ranked))
example_options = [""] + [ids[i] for i in ranked + rest]
if st.session_state.get("explore_example") not in row_of:
    st.session_state["explore_example"] = ""


def _pick_example(chart_key: str) -> None:
    """A click in a chart (customdata = pool row) selects that example everywhere."""
    points = st.session_state[chart_key]["selection"]["points"]
    if points:
        cd = points[0].get("customdata")
        row = cd[0] if isinstance(cd, list) else cd
        if row is not None and 0 <= int(row) < len(ids):
            st.session_state["explore_example"] = ids[int(row)]


def _pick_table_row() -> None:
    sel = st.session_state["explore_table"]["selection"]["rows"]
    if sel:
        st.session_state["explore_example"] = st.session_state["_explore_table_ids"][sel[0]]


def _pick_operator() -> None:
    points = st.session_state["explore_resp_chart"]["selection"]["points"]
    if points:
        cd = points[0].get("customdata")
        k = cd[0] if isinstance(cd, list) else cd
        if k is not None:
            st.session_state["explore_operator"] = int(k)


with st.sidebar:
    st.selectbox("Selected example", example_options, key="explore_example",
                 format_func=lambda e: "— none —" if not e else
                 f"{'★ ' if row_of[e] in marked else ''}{e}: {q.scores[row_of[e]]:+.3g} nats",
                 help="Click a bar, a path line or a table row to select an example; it is highlighted "
                      "in every chart. Ranked by score (nats; > 0 helps).")
sel_id = st.session_state["explore_example"]
sel = row_of[sel_id] if sel_id else None
ui.set_url(run=run.name, query=q.id, example=sel_id or None)

# ----------------------------------------------------------------------------- header
cfg = run.meta["config"]
st.caption(f"Run {ui.md_code(run.name)} · model {ui.md_code(run.model_name)} · pool {ui.md_code(run.pool_name)} "
           f"({run.n} examples) · K = {run.K} subsets, each example in d = {cfg['per_example']} of them · "
           f"operators: {cfg['mode']} mode, rank {cfg['rank']}"
           f"{' (closed-form Gauss-Newton steps)' if cfg.get('solver') == 'gauss-newton' else ''} · fit took "
           f"{ui.fmt_seconds(run.fit_state.get('seconds'))}")
if run.is_demo:
    with st.expander("About this demo run", expanded=True):
        st.markdown(ui.DEMO_EXPLANATION.format(n=run.n, K=run.K))
        found = ui.fact_ranks(run_dir)
        if found:
            hits = sum(f["best_rank"] <= 10 for f in found)
            st.markdown(f"**Result:** for **{hits} of {len(found)}** planted facts, a known source document "
                        f"is among STRIDE's top 10 of {run.n} examples (best rank per fact: "
                        + ", ".join(f"{ui.md(query_snippet(queries.get(f['query'], {}), 40))} #{f['best_rank']}"
                                    for f in found)
                        + "). Pick a fact query in the sidebar to see its sources (★).")

# ----------------------------------------------------------------------------- a new prompt
# The run's model and operators stay loaded in a background "explainer" process (see
# stride_viz/jobs/explainer.py); this page only queues the request and polls its job row.
WARM_WAIT_SECONDS = 5.0


def _show_query(run_name: str, query_id: str, job: Optional[int] = None) -> None:
    """Show ``query_id`` on the next run (applied at the top of the page); ``job``: the explain
    job still writing its continuations."""
    st.session_state["_explore_goto"] = {"run": run_name, "query": query_id}
    if job is not None:
        st.session_state.setdefault("_explore_writing", {})[query_id] = job


def _explained(run_dir: str, query_id: str) -> bool:
    """Whether the query's attribution is on disk (written whole, then swapped in)."""
    return (RunStore(run_dir).attribution_dir(query_id) / "meta.json").exists()


def _explain(run_dir: str, run_name: str, known: list[str], recovery: dict) -> None:
    """The Explain button (a form callback): check the text, then show the query if this run
    explained it before, or queue it for the run's warm explainer process."""
    st.session_state.pop("explore_explain", None)
    try:
        prompt, completion = check_new_prompt(st.session_state.get("explore_new_prompt", ""),
                                              st.session_state.get("explore_new_completion", ""))
        qid = query_id_for(prompt, completion)
        if qid in known:
            _show_query(run_name, qid)
            return
        job = ui.executor().submit("explain", {"run_dir": run_dir, "prompt": prompt,
                                               "completion": completion, "recovery": recovery})
    except JobError as e:
        st.session_state["explore_explain"] = {"error": str(e)}
        return
    # A warm explainer writes the scores in a second or two: wait for them here (reading the
    # run folder, computing nothing), so that the run after the click draws the new query at
    # once instead of the old one first; a slower answer (the first request of a run) is
    # polled below.
    store, deadline = ui.executor().store, time.monotonic() + WARM_WAIT_SECONDS
    while (not _explained(run_dir, qid) and store.get(job).active) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _explained(run_dir, qid):
        _show_query(run_name, qid, job)
        return
    st.session_state["explore_explain"] = {"job": job, "run": run_name, "run_dir": run_dir, "query": qid,
                                           "t0": time.time(),
                                           "text": query_snippet({"prompt": prompt, "completion": completion}, 60)}


def _explain_status(request: dict) -> None:
    """The request's state, polled 4 times a second until its scores are written (then its
    query is shown) or its job fails."""
    if "error" in request:
        st.error(ui.md(request["error"]))
        return
    ex = ui.executor()
    active = ex.store.get(request["job"]).active

    @st.fragment(run_every=0.25 if active else None)
    def _poll() -> None:
        job = ex.store.get(request["job"])
        if _explained(request["run_dir"], request["query"]):
            st.session_state.pop("explore_explain", None)
            _show_query(request["run"], request["query"], request["job"])
            st.rerun()
        snippet = ui.md(request["text"])
        if job.active:
            where = stage_position("explain", job.stage)
            st.info(f"Explaining {snippet}: {where[2] if where else 'waiting for the explainer process'} "
                    f"({time.time() - request['t0']:.0f} s so far)")
        else:
            st.error(f"{snippet} could not be explained: {ui.md(job.error or job.state)}")
            if active:
                st.rerun()  # stop polling

    _poll()


known_recovery = set(RecoveryConfig.__dataclass_fields__)
with st.form("explore_explain_form", border=True):
    c1, c2, c3 = st.columns([5, 3, 1], vertical_alignment="bottom")
    c1.text_area("Explain a new prompt", key="explore_new_prompt", height=68,
                 placeholder="e.g. The capital of Vorlandia is",
                 help="Any text the model is given. It is explained with this run's operators, so the "
                      "scores rank this run's training examples.")
    c2.text_input("Completion (optional)", key="explore_new_completion",
                  placeholder="empty: the model completes the prompt",
                  help="The text whose loss is explained. Empty: the model continues the prompt "
                       "(greedy, up to 24 tokens) and its own answer is explained.")
    c3.form_submit_button("Explain", key="explore_explain_submit", type="primary", on_click=_explain, args=(
        run_dir, run.name, list(run.query_ids),
        {k: v for k, v in (q.meta.get("recovery_config") or {}).items() if k in known_recovery}))
    idle = explainer.idle_seconds()
    st.caption(f"A background process keeps this run's model and operators loaded: the first request "
               f"of a run loads them once (seconds to a minute); after that a prompt's scores are written in "
               f"about a second and shown here a second or two later. It stops after {f'{idle / 60:g} minutes' if idle >= 60 else f'{idle:g} s'} "
               f"without a request.")
if st.session_state.get("explore_explain"):
    _explain_status(st.session_state["explore_explain"])

# ----------------------------------------------------------------------------- the query
st.subheader("The query")
gen = " (written by the model itself: no completion was given)" if q.info.get("completion_generated") else ""
st.markdown(f"Mean loss of the completion under the base model: **{q.info['loss_base']:.3f} nats per "
            f"token**{gen}. Each completion token is shaded by its loss.")
st.html(plots.token_loss_html(q.info["prompt"], q.info["tokens"], q.info["token_loss"]))

# ----------------------------------------------------------------------------- top examples
st.subheader("Top influential examples")
st.markdown(ui.SIGN_NOTE + (" ★ marks a known source document of this planted fact." if marked else ""))
c1, c2, c3 = st.columns([1, 1, 2])
top_n = c1.slider("Examples per side", 3, 50, 10, key="explore_top_n")
side = c2.radio("Show", ["both", "proponents (helps)", "opponents (hurts)"], key="explore_side")
search = c3.text_input("Search the text or id", key="explore_search", placeholder="e.g. Vorlandia")
shown = q.scores.astype(float).copy()
if side.startswith("proponents"):
    shown[shown < 0] = 0
elif side.startswith("opponents"):
    shown[shown > 0] = 0
n_pos, n_neg = int((q.scores > 0).sum()), int((q.scores < 0).sum())
st.caption(f"{n_pos} example{'s' if n_pos != 1 else ''} help{'s' if n_pos == 1 else ''} and {n_neg} "
           f"hurt{'s' if n_neg == 1 else ''} at the chosen λ; the other {len(ids) - n_pos - n_neg} have a "
           f"score of exactly 0 (no evidence of influence at this λ).")
st.markdown(sparsity.concentration_text(sparsity.concentration(q.scores, 10), len(ids)))
if marked:
    rows = sorted(marked)
    ranks = ranks_of(q.scores, q.backprojection, rows)
    best = rows[int(np.argmin(ranks))]
    st.markdown(f"**Planted fact check:** the best-ranked of its {len(marked)} known source document(s), "
                f"{ui.md_code(ids[best])}, is **#{min(ranks)}** of {len(ids)} (score {q.scores[best]:+.3g} nats). "
                f"A rank within the top 10 means STRIDE found where the model learnt this fact.")
st.plotly_chart(plots.top_examples_figure(ids, shown, texts, top=top_n, selected=sel, marked=marked),
                key="explore_top_chart", on_select=lambda: _pick_example("explore_top_chart"), config=plots.PLOTLY_CONFIG,
                selection_mode="points", width="stretch")

table = top_table(pool, shown, q.backprojection, sources)
if search.strip():
    needle = search.strip().lower()
    table = table[table["text"].str.lower().str.contains(needle, regex=False)
                  | table["id"].str.lower().str.contains(needle, regex=False)]
st.session_state["_explore_table_ids"] = table["id"].tolist()
st.dataframe(table.drop(columns=["row"]), key="explore_table", on_select=_pick_table_row,
             selection_mode="single-row", hide_index=True, width="stretch", height=260,
             column_config={"score_nats": st.column_config.NumberColumn("score (nats)", format="%+.4g",
                                                                        help="> 0 helps, < 0 hurts"),
                            "backprojection_nats": st.column_config.NumberColumn(
                                "back-projection (nats)", format="%+.3g",
                                help="Fast estimate: mean response of the subsets containing the example.")})
d1, d2, _ = st.columns([1, 1, 3])
d1.download_button("Download CSV", csv_text(table.drop(columns=["row"])), f"{run.name}-{q.id}.csv",
                   "text/csv", key="explore_dl_csv")
d2.download_button("Download JSON", table.drop(columns=["row"]).to_json(orient="records", indent=1),
                   f"{run.name}-{q.id}.json", "application/json", key="explore_dl_json")

if sel is not None:
    with st.container(border=True):
        s = float(q.scores[sel])
        effect = "helps (proponent)" if s > 0 else "hurts (opponent)" if s < 0 else "no detectable influence"
        st.markdown(f"**Selected example {ui.md_code(sel_id)}** (pool row {sel}){' ★ planted source' if sel in marked else ''}"
                    f" — score **{s:+.4g} nats**: {effect}; back-projection estimate "
                    f"{float(q.backprojection[sel]):+.3g} nats.")
        st.text(texts[sel])

# ----------------------------------------------------------------------------- token by token
# Each completion token's own proponents and opponents (tokens.npz: stride_viz/method/tokens.py;
# helpers and figures: stride_viz/app/tokens.py). The URL keeps the selected token (&token=3).
from stride_viz.app import tokens as token_views  # noqa: E402
from stride_viz.integrity import RunDamaged  # noqa: E402
from stride_viz.method.tokens import TOKENS_FILE, first_word_token, word_span  # noqa: E402

st.subheader("Token by token")
st.markdown(token_views.TOKEN_NOTE, unsafe_allow_html=True)


@st.cache_data(show_spinner=False, max_entries=16)
def _token_scores(path: str, query_id: str, stamp: float):
    return token_views.read_tokens(path, query_id)


_tok_file = RunStore(run_dir).attribution_dir(q.id) / TOKENS_FILE
_tokens = q.info["tokens"]
try:
    tok = _token_scores(run_dir, q.id, _tok_file.stat().st_mtime if _tok_file.exists() else 0.0)
    if tok is not None and tok.n_tokens != len(_tokens):
        raise RunDamaged(_tok_file, f"is damaged ({tok.n_tokens} tokens, the query has {len(_tokens)})",
                         RunStore(run_dir).attribution_fix(q.id))
except RunDamaged as e:
    tok = None
    st.error(ui.md(e))
_tok_job = st.session_state.get("_explore_writing", {}).get(q.id)


def _tokens_coming(job_id: Optional[int]) -> bool:
    """Whether the run's explainer is still to write this prompt's per-token scores (it does so
    after the job's continuations, when no other request waits)."""
    if job_id is None:
        return False
    job = ui.executor().store.get(job_id)
    return job.active or (job.state == "done" and job.result.get("per_token") == "following"
                          and explainer.explainer_record(ui.executor().store, run_dir) is not None)


def _tokens_shown() -> bool:
    """The token view is off by default (the page then draws its three main charts only); a
    link naming a token (&token=N) turns it on."""
    if _linked_token:
        st.session_state["explore_tokens_on"] = True
    return st.toggle("Show each token's own proponents", key="explore_tokens_on",
                     help="Each completion token's own proponents and opponents, next to the whole "
                          "completion's. A link with &token=N opens this view on token N.")


if tok is None and _tokens_coming(_tok_job):
    @st.fragment(run_every=1.0)
    def _await_tokens() -> None:
        """A prompt just explained: its explainer adds the per-token scores after the scores."""
        if _tok_file.exists() or not _tokens_coming(_tok_job):
            st.rerun()
        st.caption("The run's explainer is computing each token's own scores (one recovery per token); "
                   "they appear here in a moment.")

    _await_tokens()
elif tok is None:
    st.info("This attribution has no per-token scores: it was made before they existed, or without "
            "`--per-token`. Add them (the other results of the query are kept) with:")
    st.code(token_views.tokens_command(run_dir, q.id), language="bash")
elif not _tokens_shown():
    ui.set_url(token=None)
else:
    # the token from the link or the last view; another query shown starts at its first word
    last = st.session_state.get("_explore_token_for")
    raw = st.session_state.get("explore_token")
    if raw is None and last is not None and last[0] == q.id:
        raw = last[1]                               # the selected pill clicked again: keep it
    elif last is not None and last[0] != q.id and raw == last[1]:
        raw = None
    try:
        t_sel = int(raw)
    except (TypeError, ValueError):
        t_sel = -1
    if not 0 <= t_sel < len(_tokens):
        t_sel = first_word_token(_tokens)
    st.session_state["explore_token"] = t_sel
    st.pills("Completion token", list(range(len(_tokens))), key="explore_token",
             format_func=lambda t: ui.md(token_views.token_label(_tokens[t])),
             help="Click a token of the completion to see the training examples that help or hurt that "
                  "token alone (␣ marks a space).")
    st.session_state["_explore_token_for"] = (q.id, t_sel)
    ui.set_url(token=t_sel)
    span = word_span(_tokens, t_sel)
    as_word = len(span) > 1 and st.toggle(
        f"Score the whole word {token_views.token_label(''.join(_tokens[t] for t in span))} "
        f"(tokens {span[0]}-{span[-1]})", key="explore_token_word",
        help="A word the tokenizer split into several tokens: the mean of its tokens' scores, in nats "
             "of the word's mean token loss (each piece alone is a noisier estimate).")
    if as_word:
        tok_scores = tok.span_scores(span)
        summ = token_views.scores_summary(tok_scores, q.scores, top_n)
        st.markdown(f"**Tokens {span[0]}-{span[-1]}** "
                    f"{ui.md_code(token_views.token_label(''.join(_tokens[t] for t in span)))}: base loss "
                    f"{float(np.mean([q.info['token_loss'][t] for t in span])):.3f} nats per token; "
                    f"{summ['helps']} examples help and {summ['hurts']} hurt this word (the mean of its tokens' "
                    f"scores). {summ['shared_top']} of the whole completion's top {summ['whole_top']} proponents "
                    f"are among this word's top {top_n}.")
    else:
        tok_scores = tok.token_scores(t_sel)
        summ = token_views.token_summary(tok, t_sel, q.scores, top_n)
        st.markdown(f"**Token {t_sel}** {ui.md_code(token_views.token_label(_tokens[t_sel]))}: base loss "
                    f"{float(q.info['token_loss'][t_sel]):.3f} nats; {summ['helps']} examples help and {summ['hurts']} "
                    f"hurt this token at its own chosen λ (λ/λ_max = {summ['ratio']:.3g}). {summ['shared_top']} of the "
                    f"whole completion's top {summ['whole_top']} proponents are among this token's top {top_n}.")
    if marked:
        r_tok, r_whole = (token_views.source_rank(x, sorted(marked)) for x in (tok_scores, q.scores))
        st.markdown(f"**Planted fact check:** the best-ranked known source document is "
                    + (f"**#{r_tok}** for this {'word' if as_word else 'token'}" if r_tok
                       else f"**not a proponent** of this {'word' if as_word else 'token'}")
                    + (f", #{r_whole} for the whole completion." if r_whole else
                       ", not a proponent of the whole completion.")
                    + " An answer word should point at the fact's documents; a function word need not.")
    c_tok, c_whole = st.columns(2)
    c_tok.plotly_chart(token_views.word_top_figure(ids, tok_scores, texts, _tokens, span, top=top_n, selected=sel,
                                                   marked=marked) if as_word else
                       token_views.token_top_figure(ids, tok_scores, texts, _tokens[t_sel], index=t_sel,
                                                    top=top_n, selected=sel, marked=marked),
                       key="explore_token_chart", on_select=lambda: _pick_example("explore_token_chart"),
                       selection_mode="points", config=plots.PLOTLY_CONFIG, width="stretch")
    c_whole.plotly_chart(plots.top_examples_figure(ids, q.scores, texts, top=top_n, selected=sel, marked=marked,
                                                   title="Whole completion"),
                         key="explore_token_whole_chart", on_select=lambda: _pick_example("explore_token_whole_chart"),
                         selection_mode="points", config=plots.PLOTLY_CONFIG, width="stretch")
    st.dataframe(token_views.token_table(pool, tok_scores, q.scores, sources).drop(columns=["row"]),
                 key="explore_token_table", hide_index=True, width="stretch", height=220,
                 column_config={"token_score_nats": st.column_config.NumberColumn(
                                    "word score (nats)" if as_word else "token score (nats)", format="%+.4g",
                                    help=("nats of the word's mean token loss" if as_word else
                                          "nats of this token's loss") + "; > 0 helps, < 0 hurts"),
                                "whole_score_nats": st.column_config.NumberColumn(
                                    "whole-completion score (nats)", format="%+.4g",
                                    help="nats of mean per-token loss of the whole completion")})
    with st.expander("All tokens at once"):
        st.plotly_chart(token_views.token_matrix_figure(ids, _tokens, tok, q.scores, selected_token=t_sel,
                                                        marked=marked),
                        key="explore_token_matrix", config=plots.PLOTLY_CONFIG, width="stretch")

# ----------------------------------------------------------------------------- sparsity path
st.subheader("Sparsity path")
rc = {**RecoveryConfig().to_dict(), **(q.meta.get("recovery_config") or {})}
chosen_by = {"cv": "the lowest held-out error",
             "cv-1se": "the largest λ within one standard error of the lowest held-out error",
             "nonzeros": f"the first λ with at least {rc['target_nonzeros']} non-zero examples"}
st.markdown(f"The Lasso solution for every λ computed, from λ_max (no example) towards weak "
            f"regularisation (more examples). Coloured lines: the top examples' scores (nats); the dashed "
            f"line: the chosen λ, {chosen_by.get(rc['selection'], rc['selection'])} (cross-validation over "
            f"{rc['cv_folds']} folds of held-out operators; lower panel: held-out mean squared error, nats², "
            f"and the number of non-zero examples).")
pro, con = plots.top_indices(q.scores, 6)
st.plotly_chart(plots.sparsity_path_figure(q.path["ratios"], q.path["coefs"], q.path["nonzeros"],
                                           q.path["cv_mean"], q.path["cv_std"], q.path["chosen_index"], ids,
                                           highlight=list(pro) + list(con[:3]), selected=sel),
                key="explore_path_chart", on_select=lambda: _pick_example("explore_path_chart"), config=plots.PLOTLY_CONFIG,
                selection_mode="points", width="stretch")
# Recoverer's default bound when none is set: min(K, n) / 2 non-zero examples
end = sparsity.path_end(q.path["nonzeros"], q.path["cv_mean"], q.path["cv_std"], q.path["chosen_index"],
                        int(rc["path_length"]), int(rc["max_nonzero"] or max(1, min(run.K, run.n) // 2)))
if end is not None:
    st.info(sparsity.path_end_text(end))

# ----------------------------------------------------------------------------- responses
st.subheader("Operator responses")
st.markdown(ui.RESPONSE_NOTE, unsafe_allow_html=True)
st.markdown(sparsity.shift_text(sparsity.response_shift(q.responses, float(q.path.get("intercept", np.nan))),
                                stability_off=not cfg.get("stability_weight")))
member = ui.membership(run_dir, sel) if sel is not None else None
if member is not None:
    st.caption(f"Green: the {int(member.sum())} subsets that contain {ui.md_code(sel_id)}. If the example matters, "
               f"their responses sit apart from the others.")
else:
    st.caption("Select an example to compare the subsets that contain it with the others.")
K = q.responses.shape[0]
order = [int(k) for k in np.argsort(-q.responses)]
if st.session_state.get("explore_operator") not in order:
    st.session_state["explore_operator"] = order[0]
st.plotly_chart(plots.responses_figure(q.responses, member=member, member_label=sel_id or "",
                                       selected_k=st.session_state["explore_operator"]),
                key="explore_resp_chart", on_select=_pick_operator, selection_mode="points", width="stretch",
                config=plots.PLOTLY_CONFIG)

st.markdown("##### Base and steered continuation")
writing = st.session_state.get("_explore_writing", {}).get(q.id)
if q.continuations is None and writing is not None and ui.executor().store.get(writing).active:
    @st.fragment(run_every=1.0)
    def _await_continuations() -> None:
        """A prompt just explained: its explainer writes the continuations after the scores."""
        if not ui.executor().store.get(writing).active:
            st.rerun()
        st.caption("The run's explainer is writing the base and steered continuations of this "
                   "prompt; they appear here in a moment.")

    _await_continuations()
conts = {o["k"]: o for o in (q.continuations or {}).get("operators", [])}
st.selectbox("Operator", order, key="explore_operator",
             format_func=lambda k: f"operator {k}: y = {q.responses[k]:+.4g} nats"
                                   + (" · continuation ready" if k in conts else ""),
             help="Sorted by response; click a point of the sorted chart to pick one.")
k = st.session_state["explore_operator"]
b, s_ = st.columns(2)
with b:
    st.markdown("**Base model**")
    base = (q.continuations or {}).get("base")
    st.code(q.info["prompt"] + (base if base is not None else " …(not generated)"), language="text", wrap_lines=True)
with s_:
    st.markdown(f"**Steered by operator {k}** (y = {q.responses[k]:+.4g} nats)")
    if k in conts:
        st.code(q.info["prompt"] + conts[k]["text"], language="text", wrap_lines=True)
    else:
        job_key = f"cont_job_{run.name}_{q.id}_{k}"
        if st.button("Generate this continuation", key="explore_gen_cont",
                     help="Starts a short background job that loads the model and continues the prompt "
                          "steered by this operator."):
            try:
                st.session_state[job_key] = ui.executor().submit(
                    "continuation", {"run_dir": run_dir, "query_id": q.id, "k": int(k)})
            except JobError as e:
                st.error(str(e))
        if st.session_state.get(job_key) is not None:
            ui.live_job(st.session_state[job_key], key="explore_cont")

# ----------------------------------------------------------------------------- verify by retraining
from stride_viz.app import verify_panel  # noqa: E402  (the panel and its job: stride_viz/app/verify_panel.py)

verify_panel.render(run_dir, q.id)

# ----------------------------------------------------------------------------- report
st.subheader("Share")
st.markdown("The address bar holds this view (run, query, selected example): copy it to share. For "
            "people without the app, download the run as one HTML file with interactive charts.")


@st.cache_data(show_spinner="Writing the report…", max_entries=4)
def _report(run_dir: str, stamp: tuple) -> str:
    return build_report(run_dir)


st.download_button("Download HTML report", _report(run_dir, tuple(run.query_ids)) if st.session_state.get(
    "explore_want_report") else "", f"stride-report-{run.name}.html", "text/html", key="explore_dl_report",
    disabled=not st.session_state.get("explore_want_report"))
if not st.session_state.get("explore_want_report"):
    st.button("Prepare the HTML report", key="explore_prepare_report",
              on_click=lambda: st.session_state.update(explore_want_report=True))
