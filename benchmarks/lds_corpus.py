"""A pool and queries the project never saw, for ``benchmarks/lds.py --pool``: WordNet glosses.

Reads Debian's ``wordnet-base`` (``/usr/share/wordnet/data.noun``; install it with
``apt-get install -y wordnet-base``), keeps the noun synsets whose gloss has 6 to 30 words,
draws ``n_pool + n_queries`` of them (seeded) and writes

- ``pool.jsonl``: one document per synset, ``{"id": "wn-<offset>", "text": "<lemma>: <gloss>"}``;
- ``queries.jsonl``: the other ``n_queries`` synsets (not in the pool), ``{"id", "prompt":
  "<lemma>:", "completion": " <gloss>"}``, i.e. held-out text in the pool's own format.

    python benchmarks/lds_corpus.py wordnet --n-pool 1500 --n-queries 60 --out benchmarks/work/wordnet
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

WORDNET = Path("/usr/share/wordnet/data.noun")


def wordnet_glosses(path: Path = WORDNET) -> list[tuple[str, str, str]]:
    """(id, lemma, gloss) of every noun synset, in file order; the gloss is the definition and
    its quoted examples, as WordNet writes them after '|'."""
    if not path.is_file():
        raise SystemExit(f"{path} not found: install Debian's WordNet database with "
                         f"`apt-get install -y wordnet-base` (or pass another corpus).")
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue  # the licence header
        head, gloss = line.split("|", 1)
        fields = head.split()
        lemma = fields[4].replace("_", " ")
        out.append((f"wn-{fields[0]}", lemma, gloss.strip()))
    return out


def build(n_pool: int, n_queries: int, out: Path, seed: int = 0) -> tuple[Path, Path]:
    rows = [r for r in wordnet_glosses() if 6 <= len(r[2].split()) <= 30]
    if len(rows) < n_pool + n_queries:
        raise SystemExit(f"only {len(rows)} usable glosses; ask for fewer documents.")
    pick = np.random.default_rng(seed).choice(len(rows), size=n_pool + n_queries, replace=False)
    out.mkdir(parents=True, exist_ok=True)
    pool_path, query_path = out / "pool.jsonl", out / "queries.jsonl"
    with open(pool_path, "w") as f:
        for k in pick[:n_pool]:
            rid, lemma, gloss = rows[k]
            f.write(json.dumps({"id": rid, "text": f"{lemma}: {gloss}"}) + "\n")
    with open(query_path, "w") as f:
        for k in pick[n_pool:]:
            rid, lemma, gloss = rows[k]
            f.write(json.dumps({"id": rid, "prompt": f"{lemma}:", "completion": f" {gloss}"}) + "\n")
    return pool_path, query_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", choices=["wordnet"])
    ap.add_argument("--n-pool", type=int, default=1500)
    ap.add_argument("--n-queries", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    pool, queries = build(a.n_pool, a.n_queries, a.out, a.seed)
    print(f"wrote {pool} and {queries}", file=sys.stderr)


if __name__ == "__main__":
    main()
