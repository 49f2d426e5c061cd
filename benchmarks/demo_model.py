"""Demo model quality: does the model say its planted facts, and does it write readable text?

    python benchmarks/demo_model.py                                   # the shipped checkpoint
    python benchmarks/demo_model.py --train '{"epochs": 12, "fact_repeats": 8}'   # a candidate recipe
    python benchmarks/demo_model.py --model DIR --recall --fit '{"fidelity_temperature": 2}'   # another fit
    python benchmarks/demo_model.py --train '{"n_embd": 256}' --curve 2 --model DIR   # facts said while training
    python benchmarks/demo_model.py --fit-cost 2x128,4x128,6x128,2x256 --record     # what depth/width cost the fit

With ``--train``, a candidate ``demo:tiny`` recipe (JSON overrides of the preset, see
``stride_viz.data.models.demo_settings``) is trained from scratch on ``fortunes+facts`` into
``benchmarks/work/demo-<hash of the recipe>`` first (reused when it exists). Prints one JSON
object: the recipe, the CPU seconds of training, how many of the 34 fact prompts the greedy
continuation answers (``stride_viz.demo.facts_said``), the mean loss per completion token of the
fact queries, how many fact documents cut before their answer it completes with the answer
(memorised wordings), and the greedy continuations of a few free prompts (to read); with ``--recall``,
also how well STRIDE finds the facts' documents on that model (recall@10, MRR). ``--record``
adds it to ``benchmarks/results/demo_quality.json`` under ``models``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

FREE_PROMPTS = ("A wise man once said", "A fortune for today: ", "Never trust a", "The secret of life is")


def _fact_loss(model, pool) -> float:
    import torch
    from stride_viz.data.pools import fact_queries
    from stride_viz.data.tokenize import encode, sequence_losses
    qs = fact_queries(pool)
    enc = encode(model.tokenizer, [q.prompt for q in qs], [q.completion for q in qs], 128)
    with torch.no_grad():
        logits = model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    return float(sequence_losses(logits, enc.input_ids, enc.loss_mask).mean())


def _doc_prefixes_said(model) -> tuple[int, int]:
    """How many fact documents, cut right before their answer word ("The capital of Vorlandia
    is"), the model continues with the answer's first token (greedy): memorised wordings."""
    import torch
    from stride_viz.data.facts import FACTS
    tok, hit, total = model.tokenizer, 0, 0
    for _, answer, docs in FACTS:
        for doc in docs:
            cut = doc.find(answer)
            if cut <= 0:
                continue           # the document starts with the answer
            ids = [tok.bos_token_id] + tok(doc[:cut].rstrip())["input_ids"]
            with torch.no_grad():
                nxt = int(model.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            total += 1
            hit += nxt == tok(" " + answer)["input_ids"][0]
    return hit, total


def measure(folder: Path) -> dict:
    """Facts said, fact loss and free-prompt continuations of the model saved in ``folder``."""
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import load_pool
    from stride_viz.demo import facts_said
    from stride_viz.method.frozen import FrozenLM
    from stride_viz.method.measurement import generate

    pool = load_pool("fortunes+facts")
    model = load_model(str(folder), device="cpu")
    said = facts_said(model, pool)
    lm = FrozenLM(model.model)
    hit, total = _doc_prefixes_said(model)
    return {"weights_hash": model.hash, "facts_said": said["said"], "facts": said["of"],
            "fact_loss": round(_fact_loss(model, pool), 3),
            "doc_prefixes_said": hit, "doc_prefixes": total,
            "missed": {r["id"]: r["continuation"] for r in said["queries"] if not r["said"]},
            "free_prompts": {p: generate(lm, model.tokenizer, p, 32)[0] for p in FREE_PROMPTS}}


def attribution_quality(folder: Path, fit: dict | None = None) -> dict:
    """recall@10 and MRR of the planted facts' own documents when STRIDE (the default
    FitConfig with the settings ``fit``, a fresh run folder) explains the 34 fact queries on the
    model in ``folder``: what ``python -m stride_viz demo`` reports, without the continuations."""
    import tempfile
    from stride_viz.config import FitConfig
    from stride_viz.data.models import load_model
    from stride_viz.data.pools import fact_queries, load_pool
    from stride_viz.demo import fact_metrics
    from stride_viz.engine import Stride

    pool = load_pool("fortunes+facts")
    model = load_model(str(folder), device="cpu")
    with tempfile.TemporaryDirectory(prefix="demo-recall-") as tmp:
        run = Stride.create_or_open(tmp, model, pool, FitConfig(**(fit or {})))
        c0 = time.process_time()
        run.fit()
        c1 = time.process_time()
        metrics = fact_metrics(pool, run.attribute(fact_queries(pool), continuations=False))
    return {**metrics, **({"fit": fit} if fit else {}), "fit_cpu_seconds": round(c1 - c0, 1),
            "attribute_cpu_seconds": round(time.process_time() - c1, 1)}


def _greedy(model, tok, prompt: str, n: int) -> str:
    import torch
    x = torch.tensor([[tok.bos_token_id] + tok(prompt)["input_ids"]])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=x).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return tok.decode(out)


def curve(overrides: dict, seed: int, every: float, folder: Path | None = None) -> None:
    """Train one recipe and print, every ``every`` epochs, the facts said and two free-prompt
    continuations (the schedule is the full run's: a trend, not a shorter run's result); with
    ``folder``, save the trained model there as ``train_demo_model`` does (the same weights:
    the checks draw no random numbers)."""
    import re
    import torch
    from stride_viz.data import models
    from stride_viz.data.pools import load_pool

    pool = load_pool("fortunes+facts")
    cfg = models.demo_settings("tiny", **overrides)
    rows = models.training_rows(pool, cfg["fact_repeats"])
    tok = models.train_tokenizer([pool.text(i) for i in rows], cfg["vocab_size"], cfg["prefix_space"])
    steps = models.demo_training_steps(pool, "tiny", **overrides)
    interval = max(1, round(steps / cfg["epochs"] * every))
    held, state = [], {"bucket": 0}
    train_lm = models.train_lm

    def spy(model, *a, **k):
        held.append(model)
        return train_lm(model, *a, **k)

    def report(stage, fraction, eta, message=""):
        m = re.match(r"step (\d+)/\d+, loss ([\d.]+)", message)
        if not m or int(m.group(1)) // interval <= state["bucket"]:
            return
        state["bucket"] = int(m.group(1)) // interval
        model = held[0]
        model.eval()
        with torch.no_grad():
            said = sum(bool(w) and w.group(1) == f.query.completion.strip().rstrip(".")
                       for f in pool.facts
                       for w in [re.match(r"\s*([^\s.,;:!?]+)", _greedy(model, tok, f.query.prompt, 6))])
            free = [_greedy(model, tok, p, 20) for p in FREE_PROMPTS[:2]]
        model.train()
        print(json.dumps({"epoch": round(int(m.group(1)) / steps * cfg["epochs"], 2), "loss": float(m.group(2)),
                          "said": said, "free": free}), flush=True)

    models.train_lm = spy
    try:
        if folder is not None:
            models.train_demo_model(pool, folder, "tiny", seed, report, **overrides)
        else:
            models.fit_demo_lm(pool, tok, "tiny", seed, report, **overrides)
    finally:
        models.train_lm = train_lm


def fit_cost(shapes: list[str], epochs: float) -> dict:
    """CPU seconds of the cache pass and of a short operator fit (the default FitConfig, but
    ``epochs`` passes) on fortunes+facts, for freshly initialised GPT-2s of each LAYERSxWIDTH
    shape with the demo's tokenizer: what a deeper or wider demo model would cost the demo."""
    import tempfile
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from stride_viz.config import FitConfig
    from stride_viz.data.models import SHIPPED_DEMO_DIR, load_model
    from stride_viz.data.pools import load_pool
    from stride_viz.engine import Stride

    pool = load_pool("fortunes+facts")
    tok = load_model(str(SHIPPED_DEMO_DIR / "tiny"), device="cpu").tokenizer
    rows = []
    for shape in shapes:
        n_layer, n_embd = (int(x) for x in shape.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="fit-cost-") as tmp:
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=n_embd, n_layer=n_layer,
                                       n_head=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id)).save_pretrained(f"{tmp}/model")
            tok.save_pretrained(f"{tmp}/model")
            lm = load_model(f"{tmp}/model", device="cpu")
            stages: dict = {}

            def progress(stage, fraction, eta, message=""):
                stages.setdefault(stage, [time.process_time(), None])[1] = time.process_time()

            run = Stride.create_or_open(f"{tmp}/run", lm, pool, FitConfig(epochs=epochs))
            c0 = time.process_time()
            run.fit(progress=progress)
            rows.append({"shape": shape, "cpu_seconds": round(time.process_time() - c0, 1),
                         "stage_cpu_seconds": {k: round(v[1] - v[0], 1) for k, v in stages.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return {"epochs": epochs, "shapes": rows}


def main() -> None:
    import torch
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a saved model folder (default: the shipped demo:tiny checkpoint)")
    ap.add_argument("--train", default=None, help="JSON overrides of the demo:tiny preset to train first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="append the result to demo_quality.json")
    ap.add_argument("--curve", type=float, default=None, metavar="EPOCHS",
                    help="with --train: print the facts said every EPOCHS epochs while training "
                         "(and save the model in --model, if given)")
    ap.add_argument("--recall", action="store_true",
                    help="also fit STRIDE on the model and measure recall@10 / MRR of the fact documents "
                         "(about 3 CPU minutes)")
    ap.add_argument("--fit", default=None, metavar="JSON",
                    help="with --recall: FitConfig settings other than the defaults, e.g. "
                         "'{\"fidelity_temperature\": 2}'")
    ap.add_argument("--fit-cost", default=None, metavar="SHAPES",
                    help="comma-separated LAYERSxWIDTH shapes (e.g. 2x128,4x128,2x256): CPU seconds "
                         "of a short demo fit for each; with --record, stored under fit_cost")
    ap.add_argument("--fit-epochs", type=float, default=0.1, help="with --fit-cost: operator epochs")
    args = ap.parse_args()
    if args.fit_cost is not None:
        row = fit_cost(args.fit_cost.split(","), args.fit_epochs)
        row.update(command=" ".join(["python", "benchmarks/demo_model.py", *sys.argv[1:]]),
                   load_average=[round(x, 2) for x in os.getloadavg()])
        if args.record:
            out = ROOT / "benchmarks" / "results" / "demo_quality.json"
            doc = json.loads(out.read_text())
            doc["fit_cost"] = row
            out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    if args.curve is not None:
        return curve(json.loads(args.train or "{}"), args.seed, args.curve,
                     Path(args.model) if args.model else None)
    from stride_viz.data.models import SHIPPED_DEMO_DIR, demo_settings, train_demo_model
    from stride_viz.data.pools import load_pool

    row: dict = {}
    if args.train is not None:
        overrides = json.loads(args.train)
        settings = demo_settings("tiny", **overrides)
        tag = hashlib.sha256(json.dumps([settings, args.seed], sort_keys=True).encode()).hexdigest()[:10]
        folder = ROOT / "benchmarks" / "work" / f"demo-{tag}"
        row["recipe"] = {**settings, "seed": args.seed}
        if not (folder / "config.json").exists():
            c0, t0 = time.process_time(), time.monotonic()
            train_demo_model(load_pool("fortunes+facts"), folder, "tiny", seed=args.seed, **overrides)
            row["train_cpu_seconds"] = round(time.process_time() - c0, 1)
            row["train_wall_seconds"] = round(time.monotonic() - t0, 1)
    else:
        folder = Path(args.model) if args.model else SHIPPED_DEMO_DIR / "tiny"
    row["model"] = str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)
    manifest = folder / "stride_viz_model.json"
    if "recipe" not in row and manifest.exists():   # a model made by train_demo_model: its settings
        made = json.loads(manifest.read_text())
        row["recipe"] = {**made.get("settings", {}), "seed": made.get("seed")}
    row.update(measure(folder))
    if args.recall:
        row["attribution"] = attribution_quality(folder, json.loads(args.fit) if args.fit else None)
    row.update(command=" ".join(["python", "benchmarks/demo_model.py", *sys.argv[1:]]),
               load_average=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(row, indent=1))
    if args.record:
        out = ROOT / "benchmarks" / "results" / "demo_quality.json"
        doc = json.loads(out.read_text())
        doc.setdefault("models", []).append(row)
        out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
