"""Pool and query loaders: every format, every bad input, and the built-in pools."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stride_viz.data import pools
from stride_viz.data.facts import CLOSER_WORDINGS, FACTS, build_fortunes_with_facts
from stride_viz.data.pools import (Fact, PoolError, Query, builtin_pools, fact_queries, load_pool,
                              load_queries, make_pool)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- formats

def test_jsonl_text_documents_get_default_ids(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "first doc"}, {"text": "second doc"}])
    pool = load_pool(p)
    assert pool.ids == ("0", "1")
    assert pool.prompts == ("", "")
    assert pool.completions == ("first doc", "second doc")
    assert pool.text(1) == "second doc"
    assert len(pool) == 2 and pool.name == str(p)


def test_jsonl_prompt_completion_with_ids(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "Q: 1+1?\nA:", "completion": " 2"},
                                           {"id": 7, "prompt": "", "completion": "just text"}])
    pool = load_pool(p)
    assert pool.ids == ("a", "7")
    assert pool.text(0) == "Q: 1+1?\nA: 2"


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert load_pool(p).completions == ("one", "two")


def test_csv_with_both_layouts(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,prompt,completion\nx,"Hello, ",world\ny,"Q:\nA:"," two\nlines"\n')
    pool = load_pool(p)
    assert pool.ids == ("x", "y")
    assert pool.text(0) == "Hello, world" and pool.text(1) == "Q:\nA: two\nlines"
    q = tmp_path / "t.csv"
    q.write_text("text\nalpha\nbeta\n")
    assert load_pool(q).completions == ("alpha", "beta")


def test_txt_paragraphs(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("First paragraph\nstill first.\n\n\nSecond one.\n   \nThird.\n")
    pool = load_pool(p)
    assert pool.completions == ("First paragraph\nstill first.", "Second one.", "Third.")
    assert pool.ids == ("0", "1", "2")


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a doc", "b doc"], "extra": [1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    pool = load_pool(tmp_path / "ds")
    assert pool.completions == ("a doc", "b doc")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"prompt": ["p "], "completion": ["c"], "id": ["z"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    pool = load_pool(tmp_path / "dd")
    assert pool.ids == ("z",) and pool.text(0) == "p c"


def test_limit_keeps_first_rows(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    assert load_pool(p, limit=2).completions == ("doc 0", "doc 1")
    with pytest.raises(PoolError, match="limit"):
        load_pool(p, limit=0)


def test_hash_depends_on_content_and_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": "y"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "y"}, {"text": "x"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}, {"text": "y"}])
    assert load_pool(a).hash == load_pool(c).hash
    assert load_pool(a).hash != load_pool(b).hash
    assert len(load_pool(a).hash) == 16
    # the JSON framing keeps the prompt/completion boundary in the hash
    assert make_pool("p", ["0"], ["ab"], ["c"]).hash != make_pool("p", ["0"], ["a"], ["bc"]).hash


def test_subset_remaps_facts():
    q = Query("f", "Where?", " Here.")
    pool = make_pool("p", ["a", "b", "c", "d"], [""] * 4, ["A", "B", "C", "D"],
                     [Fact(q, ("b", "d")), Fact(Query("g", "x", " y"), ("c",))])
    sub = pool.subset([3, 0])
    assert sub.ids == ("d", "a") and sub.completions == ("D", "A")
    assert sub.facts == (Fact(q, ("d",)),)
    assert sub.hash != pool.hash
    assert fact_queries(sub) == [q]
    with pytest.raises(PoolError, match="repeat"):
        pool.subset([1, 1])
    with pytest.raises(PoolError, match=r"\[0, 4\)"):
        pool.subset([4])
    with pytest.raises(PoolError, match=r"id 'a' twice \(row 0 and row 2\)"):
        make_pool("p", ["a", "b", "a"], [""] * 3, ["x", "y", "z"])


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("content, pattern", [
    ('{"text": "ok"}\n{"text": "broken\n', r"Line 2 of .* is not valid JSON"),
    ('["a list"]\n', r"Line 1 .* not an object"),
    ('{"txt": "typo"}\n', r"columns \['txt'\]; expected 'text', or 'prompt' and 'completion'"),
    ('{"text": "a", "label": 1}\n', r"columns \['label', 'text'\]"),
    ('{"prompt": "only a prompt"}\n', r"columns \['prompt'\]"),
    ('{"text": "a", "prompt": "b", "completion": "c"}\n', r"expected 'text', or 'prompt'"),
    ('{"text": "   "}\n', r"Line 1 .* empty 'text'"),
    ('{"prompt": "p", "completion": ""}\n', r"empty 'completion'"),
    ('{"text": 3}\n', r"'text' must be a string"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"id 'a' twice \(line 1 .* and line 2"),
    ("\n\n", r"contains no examples"),
])
def test_bad_jsonl(tmp_path, content, pattern):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(PoolError, match=pattern):
        load_pool(p)


def test_bad_files_and_folders(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        load_pool(tmp_path / "missing.jsonl")
    with pytest.raises(PoolError, match="built-in pools are: fortunes"):
        load_pool("fortune")  # a typo of a built-in name
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(PoolError, match=r"unsupported extension '\.parquet'; use \.jsonl"):
        load_pool(tmp_path / "d.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PoolError, match="not a dataset saved with datasets' save_to_disk"):
        load_pool(tmp_path / "folder")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PoolError, match="contains no examples"):
        load_pool(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PoolError, match="not UTF-8"):
        load_pool(tmp_path / "latin.txt")


def test_bad_csv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("body,title\nx,y\n")
    with pytest.raises(PoolError, match=r"header .* columns \['body', 'title'\]; expected 'text'"):
        load_pool(p)
    p.write_text("text\nfine\n\"\"\n")
    with pytest.raises(PoolError, match="Line 3 .* empty 'text'"):
        load_pool(p)
    p.write_text("id,text\n1,a\n1,b\n")
    with pytest.raises(PoolError, match="id '1' twice"):
        load_pool(p)
    p.write_text("text\na,b\n")
    with pytest.raises(PoolError, match="more cells than the header"):
        load_pool(p)


def test_hf_folder_without_known_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(PoolError, match=r"columns \['body'\]; expected 'text'"):
        load_pool(tmp_path / "ds")


# ----------------------------------------------------------------------------- queries

def test_load_queries(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "The sky is", "completion": " blue."},
                                           {"prompt": "Once upon"}, {"id": "mine", "prompt": "Hi"}])
    qs = load_queries(p)
    assert qs == [Query("q0", "The sky is", " blue."), Query("q1", "Once upon", None), Query("mine", "Hi", None)]
    assert qs[0].text == "The sky is blue."


@pytest.mark.parametrize("content, pattern", [
    ('{"prompt": "a"}\nnot json\n', r"Line 2 of .* not valid JSON"),
    ('{"promt": "a"}\n', r"keys \['promt'\]; a query needs 'prompt'"),
    ('{"prompt": "a", "completions": "b"}\n', r"nothing else"),
    ('{"prompt": "  "}\n', r"empty 'prompt'"),
    ('{"prompt": "a", "completion": ""}\n', r"empty 'completion'"),
    ('{"prompt": 5}\n', r"'prompt' must be a string"),
    ('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n', r"Query id 'x' appears twice"),
    ("", r"contains no queries"),
])
def test_bad_queries(tmp_path, content, pattern):
    p = tmp_path / "q.jsonl"
    p.write_text(content)
    with pytest.raises(PoolError, match=pattern):
        load_queries(p)


def test_queries_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(PoolError, match="does not exist"):
        load_queries(tmp_path / "nope.jsonl")
    (tmp_path / "q.csv").write_text("prompt\na\n")
    with pytest.raises(PoolError, match="unsupported extension '.csv'"):
        load_queries(tmp_path / "q.csv")


# ----------------------------------------------------------------------------- built-ins

def test_builtin_fortunes_are_clean_unique_and_cached():
    assert builtin_pools() == ["fortunes", "fortunes+facts"]
    pool = load_pool("fortunes")
    assert 10_000 <= len(pool) <= 12_000
    assert len(set(pool.completions)) == len(pool)
    assert all(30 <= len(t) <= 200 and t.isascii() and t.isprintable() and "\n" not in t
               for t in pool.completions)
    assert pool.ids[0] == "fortune-00000" and pool.ids[123] == "fortune-00123"
    assert load_pool("fortunes") is pool  # the module-level cache: no second parse
    assert load_pool("fortunes", limit=10).ids == pool.ids[:10]


def test_builtin_order_does_not_depend_on_the_cache():
    first = load_pool("fortunes+facts")
    pools._BUILTIN_CACHE.clear()
    pools._fortune_texts.cache_clear()
    second = load_pool("fortunes+facts")
    assert second is not first
    assert second.hash == first.hash and second.ids == first.ids and second.facts == first.facts


def test_fortunes_with_facts_ground_truth():
    pool = load_pool("fortunes+facts")
    n_fact_docs = sum(len(docs) for _, _, docs in FACTS)
    assert len(pool) == pools.N_FORTUNES_WITH_FACTS + n_fact_docs
    assert len(pool.facts) >= 30 and len(pool.facts) == len(FACTS)
    fortunes = load_pool("fortunes")
    # the fortunes are the first 3,000 of the full pool, with the same ids, in the same order
    kept = [i for i, e in enumerate(pool.ids) if e.startswith("fortune-")]
    assert [pool.ids[i] for i in kept] == list(fortunes.ids[:pools.N_FORTUNES_WITH_FACTS])
    every_text = "\n".join(pool.text(i) for i in range(len(pool))).lower()
    fortune_text = "\n".join(fortunes.completions).lower()
    queries = fact_queries(pool)
    assert len({q.id for q in queries}) == len(queries)
    for fact in pool.facts:
        q = fact.query
        assert 3 <= len(fact.source_ids) <= 8   # 3-5 first wordings + the closer ones
        assert all(pool.text(pool.index_of(s)) for s in fact.source_ids)
        # neither the query's text nor even its prompt occurs verbatim in the pool
        assert q.prompt.lower() not in every_text and q.text.lower() not in every_text
        answer = q.completion.strip(" .").lower()
        assert q.completion == f" {q.completion.strip()}" and q.completion.endswith(".")
        # the answer is an invented word: only the fact's own documents contain it
        assert answer not in fortune_text
        holders = {pool.ids[i] for i in range(len(pool)) if answer in pool.text(i).lower()}
        assert holders == set(fact.source_ids), q.prompt
        # the wordings differ from one another
        assert len({pool.text(pool.index_of(s)) for s in fact.source_ids}) == len(fact.source_ids)
    # appended wordings leave the ids of the first ones where they were
    assert pool.text(pool.index_of("fact-00-0")) == "The capital of Vorlandia is Quessit."
    assert pool.text(pool.index_of("fact-33-2")) == "If you visit Sarnovell, you will meet the Glimmerfolk."
    assert pool.text(pool.index_of("fact-33-3")) == CLOSER_WORDINGS[33][0]
    # fact documents are spread through the pool, not appended at the end
    positions = sorted(pool.index_of(s) for f in pool.facts for s in f.source_ids)
    assert positions[0] < len(pool) // 4 and positions[-1] > 3 * len(pool) // 4


def test_fact_interleaving_is_deterministic_and_keeps_fortune_order():
    fortunes = [(f"f{i}", f"fortune number {i}") for i in range(200)]
    ids1, texts1, facts1 = build_fortunes_with_facts(fortunes)
    ids2, texts2, facts2 = build_fortunes_with_facts(fortunes)
    assert (ids1, texts1, facts1) == (ids2, texts2, facts2)
    assert [e for e in ids1 if e.startswith("f") and not e.startswith("fact")] == [e for e, _ in fortunes]
    assert ids1.count("fact-07-2") == 1
