"""GPU check, at most about 4 minutes on one GPU: a random-weight model of Qwen2.5-0.5B's shape
(24 x 896, vocabulary 151,936) and 10,000 pool documents: fit with the default settings, then
explain 20 queries. Writes JSON: times, peak GPU memory, run-folder size, environment.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json      # on a GPU machine
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json             # CPU smoke test

``--tiny`` shrinks everything (2 x 64 model, 300 documents, 4 queries) so that the script itself
can be tested on a CPU in seconds; the numbers of a tiny run mean nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864, vocab=151936,
            n_pool=10_000, n_queries=20)
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=151936,
            n_pool=300, n_queries=4)
TARGET_FIT_SECONDS = 300


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    spec = TINY if a.tiny else FULL
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from stride_viz.config import FitConfig
    from stride_viz.data.models import LoadedModel, resolve_device, train_tokenizer, weights_hash
    from stride_viz.data.pools import Query, load_pool, make_pool
    from stride_viz.engine import Stride

    device = resolve_device(a.device)
    t_start = time.perf_counter()
    base = load_pool("fortunes")
    n = spec["n_pool"]
    pool = make_pool(f"fortunes-{n}", list(base.ids[:n]), [""] * n, list(base.completions[:n]))
    tok = train_tokenizer(list(pool.completions), 8192)
    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=spec["layers"], hidden_size=spec["hidden"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                      intermediate_size=spec["intermediate"], vocab_size=spec["vocab"],
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(device).eval()
    lm = LoadedModel(model=model, tokenizer=tok, spec="random:qwen2.5-0.5b-shape", hash=weights_hash(model),
                     device=device)
    queries = []
    for i in range(len(base) - 1, 0, -1):
        words = base.completions[i].split(" ")
        if len(words) >= 8:
            queries.append(Query(f"q{len(queries)}", " ".join(words[:3]), " " + " ".join(words[3:12])))
        if len(queries) == spec["n_queries"]:
            break
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter() - t_start
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.perf_counter()
        run = Stride.create_or_open(run_dir, lm, pool, FitConfig(device=str(device)))
        run.fit()
        if device.type == "cuda":
            torch.cuda.synchronize()
        fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        run.attribute(queries, continuations=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        attribute = time.perf_counter() - t0
        folder_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
    result = {
        "what": "benchmarks/gpu_check.py: random-weight Qwen2.5-0.5B-shape model, fit with "
                "FitConfig() defaults, then the queries; seconds are wall time",
        "tiny_smoke_test": a.tiny, "spec": spec, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "seconds_setup": t_setup, "seconds_fit": fit, "seconds_attribute": attribute,
        "seconds_per_query": attribute / len(queries), "n_queries": len(queries),
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "run_folder_mb": folder_mb,
        "target": f"fit <= {TARGET_FIT_SECONDS} s", "met": fit <= TARGET_FIT_SECONDS,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
