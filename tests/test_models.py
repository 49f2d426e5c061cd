"""Model loading, the demo model builder and the shared LM training recipe (tiny CPU models)."""
from __future__ import annotations

import json

import pytest
import torch

from stride_viz.data import models
from stride_viz.data.models import (LoadedModel, ModelError, data_home, demo_model_dir, demo_settings, encode_pool,
                               fit_demo_lm, load_model, train_demo_model, train_lm, train_tokenizer,
                               weights_hash)
from stride_viz.data.pools import make_pool
from stride_viz.data.tokenize import sequence_losses

DOCS = [
    "The capital of Vorlandia is Quessit.",
    "A rolling stone gathers no moss.",
    "Quessit is the largest city of Vorlandia.",
    "You will meet a tall dark stranger.",
    "Many hands make light work.",
    "Fortune favours the bold, and the bold favour fortune.",
    "Every cloud has a silver lining.",
    "Travellers to Vorlandia arrive first in Quessit.",
]
TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=300, batch_size=4, max_length=48,
            fact_repeats=1, weight_decay=0.01, prefix_space=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads spin
    against each other and a step takes 10x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool():
    return make_pool("docs", [f"d{i}" for i in range(len(DOCS))], [""] * len(DOCS), DOCS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 1-layer width-32 GPT-2 and a tokenizer trained here, saved like any HF model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(DOCS, vocab_size=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2))
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_load_model_from_folder(tiny_dir):
    lm = load_model(str(tiny_dir), device="cpu")
    assert isinstance(lm, LoadedModel)
    assert lm.device == torch.device("cpu") and lm.spec == str(tiny_dir)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer.pad_token == "<|endoftext|>" and lm.tokenizer.bos_token_id is not None
    assert len(lm.hash) == 16 and lm.hash == weights_hash(lm.model)
    # the same folder gives the same hash; changing one weight changes it
    assert load_model(str(tiny_dir), device="cpu").hash == lm.hash
    with torch.no_grad():
        lm.model.transformer.wte.weight[0, 0] += 1.0
    assert weights_hash(lm.model) != lm.hash


def test_half_precision_weights_run_in_float32_on_cpu(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = AutoModelForCausalLM.from_pretrained(tiny_dir).half()
    half.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.hash == weights_hash(half)  # the hash names the saved weights, not the cast
    assert lm.hash != load_model(str(tiny_dir), device="cpu").hash


def test_pad_token_falls_back_to_eos(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.pad_token = None
    models._set_pad_token(tok)
    assert tok.pad_token == tok.eos_token


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing"), device="cpu")


def test_folder_with_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        load_model(str(tmp_path), device="cpu")


def test_unreachable_hub_id_suggests_a_local_folder(monkeypatch):
    # the hub is offline here; the message must say so instead of hanging in retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pass that local folder"):
        load_model("made-up-org/no-such-model-7f3a", device="cpu")
    with pytest.raises(ModelError, match="valid Hugging Face hub id"):
        load_model("not a model id!", device="cpu")


def test_bad_device_and_preset(tiny_dir):
    with pytest.raises(ModelError, match="'device' parameter"):
        load_model(str(tiny_dir), device="tpu-ish")
    with pytest.raises(ModelError, match="demo:tiny, demo:small"):
        load_model("demo:huge")


def test_data_home_and_demo_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    assert data_home() == tmp_path
    assert demo_model_dir() == tmp_path / "models" / "demo-tiny"
    assert demo_model_dir("small") == tmp_path / "models" / "demo-small"


def test_demo_spec_trains_once_then_loads_the_folder(monkeypatch, tmp_path, pool):
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path))
    monkeypatch.setitem(models.DEMO_PRESETS, "tiny", {**models.DEMO_PRESETS["tiny"], **TINY, "steps": 2})
    monkeypatch.setattr("stride_viz.data.pools.load_pool", lambda name: pool)
    calls = []
    lm = load_model("demo", device="cpu", progress=lambda *a: calls.append(a))
    assert (tmp_path / "models" / "demo-tiny" / "config.json").exists()
    assert calls and all(c[0] == "train-model" for c in calls)
    calls.clear()
    assert load_model("demo:tiny", device="cpu").hash == lm.hash
    assert calls == []  # the second time it is only loaded


def _train(pool, out, seed):
    train_demo_model(pool, out, "tiny", seed=seed, **TINY, steps=4)
    return load_model(str(out), device="cpu")


def test_train_demo_model_is_deterministic_per_seed(tmp_path, pool):
    a = _train(pool, tmp_path / "a", seed=0)
    b = _train(pool, tmp_path / "b", seed=0)
    c = _train(pool, tmp_path / "c", seed=1)
    assert a.hash == b.hash
    assert c.hash != a.hash
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"]) == (1, 32)
    # the saved tokenizer round-trips text and knows its BOS/EOS
    tok = a.tokenizer
    assert tok.decode(tok("Quessit is far.")["input_ids"]) == "Quessit is far."
    assert tok.bos_token == tok.eos_token == "<|endoftext|>"
    # no half-written temporary folders are left next to the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    # readable by everyone (a shared data folder, a shipped checkpoint)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "a").iterdir()} == {0o644}


def test_fit_demo_lm_with_a_fixed_tokenizer_for_retraining(pool):
    tok = train_tokenizer(DOCS, vocab_size=300)
    settings = {**TINY, "steps": 3}
    a = fit_demo_lm(pool.subset([0, 1, 2, 3]), tok, "tiny", seed=5, **settings)
    b = fit_demo_lm(pool.subset([0, 1, 2, 3]), tok, "tiny", seed=5, **settings)
    c = fit_demo_lm(pool.subset([4, 5, 6, 7]), tok, "tiny", seed=5, **settings)
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    assert demo_settings("tiny", steps=3)["epochs"] is None


def test_train_demo_model_rejects_unknown_settings(tmp_path, pool):
    with pytest.raises(ValueError, match="Unknown demo model setting"):
        train_demo_model(pool, tmp_path / "x", "tiny", n_layers=3)


def test_train_lm_lowers_the_loss_and_restores_eval_mode(tiny_dir, pool):
    lm = load_model(str(tiny_dir), device="cpu")
    enc = encode_pool(lm.tokenizer, pool, 48)

    def mean_loss():
        with torch.no_grad():
            logits = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        return sequence_losses(logits, enc.input_ids, enc.loss_mask).mean().item()

    before = mean_loss()
    reports = []
    out = train_lm(lm.model, lm.tokenizer, enc, epochs=15, batch_size=4, lr=1e-2, seed=0,
                   progress=lambda *a: reports.append(a))
    assert out is lm.model
    assert mean_loss() < before - 1.0
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert reports[-1][0] == "train-model" and reports[-1][1] == 1.0


def test_train_lm_same_seed_same_weights_and_global_rng_untouched(tiny_dir, pool):
    def run(seed):
        lm = load_model(str(tiny_dir), device="cpu")
        train_lm(lm.model, lm.tokenizer, pool, steps=3, batch_size=3, lr=1e-2, seed=seed, max_length=48)
        return weights_hash(lm.model)

    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    h0 = run(0)
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is not consumed
    assert run(0) == h0 and run(1) != h0


def test_train_lm_completion_only_loss(tiny_dir):
    """Prompt/completion pairs: only completion tokens are scored, and training lowers their loss."""
    lm = load_model(str(tiny_dir), device="cpu")
    pairs = make_pool("pairs", ["a", "b"], ["The capital of Vorlandia is", "Every cloud has"],
                      [" Quessit.", " a silver lining."])
    enc = encode_pool(lm.tokenizer, pairs, 48)
    assert enc.loss_mask.sum() < enc.attention_mask.sum() - 4  # prompts are not scored

    def loss():
        with torch.no_grad():
            logits = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        return sequence_losses(logits, enc.input_ids, enc.loss_mask).mean().item()

    before = loss()
    train_lm(lm.model, lm.tokenizer, enc, steps=30, batch_size=2, lr=1e-2, seed=0)
    assert loss() < before / 2


def test_train_lm_argument_checks(tiny_dir, pool):
    lm = load_model(str(tiny_dir), device="cpu")
    with pytest.raises(ValueError, match="either 'epochs' or 'steps'"):
        train_lm(lm.model, lm.tokenizer, pool, epochs=1, steps=1)
    with pytest.raises(ValueError, match="'lr' parameter of train_lm must be a positive number"):
        train_lm(lm.model, lm.tokenizer, pool, steps=1, lr=0)
    with pytest.raises(ValueError, match="'batch_size'"):
        train_lm(lm.model, lm.tokenizer, pool, steps=1, batch_size=2.5)


def test_epoch_batches_cover_every_example_once_and_group_lengths():
    lengths = torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0))
    batches = models._epoch_batches(lengths, 8, torch.Generator().manual_seed(1))
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    # padding wasted inside batches is far below that of random batches
    padded = sum(len(b) * lengths[b].max().item() for b in batches)
    random_padded = sum(len(b) * lengths[b].max().item() for b in torch.randperm(1000).split(8))
    assert padded < 0.8 * random_padded
    again = models._epoch_batches(lengths, 8, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(batches, again))


def test_a_shipped_checkpoint_is_loaded_instead_of_training_when_it_fits_the_recipe(monkeypatch, tmp_path, pool):
    from stride_viz import integrity
    monkeypatch.setenv("STRIDE_VIZ_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(models.DEMO_PRESETS, "tiny", {**models.DEMO_PRESETS["tiny"], **TINY, "steps": 2})
    monkeypatch.setattr("stride_viz.data.pools.load_pool", lambda name: pool)
    monkeypatch.setattr(models, "SHIPPED_DEMO_DIR", tmp_path / "shipped")
    shipped = train_demo_model(pool, tmp_path / "shipped" / "tiny", "tiny")     # what train-model writes
    manifest = json.loads((shipped / models.MANIFEST).read_text())
    assert manifest["settings"] == demo_settings("tiny") and manifest["pool_hash"] == pool.hash
    calls = []
    lm = load_model("demo", device="cpu", progress=lambda *a: calls.append(a))
    assert calls == [] and lm.hash == manifest["weights_hash"]                  # loaded, not trained
    assert models.demo_model_source("tiny") == shipped and not (tmp_path / "home" / "models").exists()
    # a checkpoint made by another recipe does not stand in for this one
    monkeypatch.setitem(models.DEMO_PRESETS, "tiny", {**models.DEMO_PRESETS["tiny"], "lr": 1e-3})
    assert models.demo_model_source("tiny") is None and not models.demo_model_available("tiny")
    monkeypatch.setitem(models.DEMO_PRESETS, "tiny", {**models.DEMO_PRESETS["tiny"], "lr": manifest["settings"]["lr"]})
    # weights that differ from the recorded hash: a warning, and the model is trained instead
    (shipped / models.MANIFEST).write_text(json.dumps({**manifest, "weights_hash": "0" * 16}))
    warnings = []
    integrity.warnings_to(warnings.append)
    try:
        rebuilt = load_model("demo", device="cpu", progress=lambda *a: calls.append(a))
    finally:
        integrity.warnings_to(None)
    assert len(warnings) == 1 and "not the 0000000000000000" in warnings[0]
    assert calls and (tmp_path / "home" / "models" / "demo-tiny" / models.MANIFEST).exists()
    assert rebuilt.hash == lm.hash                                              # same recipe, same seed


def test_fact_repeats_show_the_fact_documents_more_often(pool):
    from stride_viz.data.records import Fact, Query
    facts = (Fact(Query("f", "Where is Quessit?", " Vorlandia."), ("d0", "d2")),)
    fpool = make_pool("docs", pool.ids, pool.prompts, pool.completions, facts)
    tok = train_tokenizer(DOCS, vocab_size=300)
    settings = {**TINY, "epochs": 1}
    assert models.demo_training_steps(fpool, "tiny", **settings) == 2                  # 8 rows, batches of 4
    three = {**settings, "fact_repeats": 3}
    assert models.demo_training_steps(fpool, "tiny", **three) == 3                     # 8 + 2 x 2 rows
    calls = []
    fit_demo_lm(fpool, tok, "tiny", progress=lambda *a: calls.append(a), **three)
    assert calls[-1][3] == "3 steps"
    assert models.demo_training_steps(pool, "tiny", **three) == 2                      # no facts: no effect
    with pytest.raises(ValueError, match="'fact_repeats' demo model setting needs the pool itself"):
        fit_demo_lm(encode_pool(tok, fpool, 48), tok, "tiny", **three)
    with pytest.raises(ValueError, match="'fact_repeats' demo model setting must be a positive integer"):
        demo_settings("tiny", fact_repeats=0)


def test_facts_said_needs_the_answer_as_the_first_word_of_the_greedy_continuation(tiny_dir, monkeypatch):
    from stride_viz.data.records import Fact, Query
    from stride_viz.demo import facts_said
    facts = tuple(Fact(Query(f"f{i}", f"prompt {i}", " Quessit."), ("d0",)) for i in range(4))
    fpool = make_pool("docs", [f"d{i}" for i in range(len(DOCS))], [""] * len(DOCS), DOCS, facts)
    said = {"prompt 0": " Quessit. It is far.", "prompt 1": "Quessit,", "prompt 2": " the Quessit.",
            "prompt 3": " Quessitville."}
    monkeypatch.setattr("stride_viz.method.measurement.generate",
                        lambda lm, tok, prompt, n: [said[prompt]])
    out = facts_said(load_model(str(tiny_dir), device="cpu"), fpool)
    assert (out["said"], out["of"], out["rate"]) == (2, 4, 0.5)
    assert [q["said"] for q in out["queries"]] == [True, True, False, False]
    assert out["queries"][2] == {"id": "f2", "prompt": "prompt 2", "answer": "Quessit",
                                 "continuation": " the Quessit.", "said": False}


def test_a_prefix_space_tokenizer_gives_a_first_word_its_mid_sentence_token():
    tok = train_tokenizer(DOCS, vocab_size=300, prefix_space=True)
    assert tok("Quessit is far.")["input_ids"] == tok(" Quessit is far.")["input_ids"]
    assert tok(" Quessit.")["input_ids"] == tok(" Quessit.")["input_ids"]          # no second space
    plain = train_tokenizer(DOCS, vocab_size=300)
    assert plain("Quessit")["input_ids"] != plain(" Quessit")["input_ids"]


def test_the_shipped_demo_checkpoint_is_made_by_the_current_recipe():
    """The checkpoint in stride_viz/data/demo_model/tiny must be what `train-model` writes for
    today's tiny preset: after a recipe change this fails until the checkpoint is retrained
    (else every demo would quietly train the model first)."""
    folder = models.SHIPPED_DEMO_DIR / "tiny"
    manifest = json.loads((folder / models.MANIFEST).read_text())
    assert manifest["settings"] == demo_settings("tiny"), "retrain the shipped demo:tiny checkpoint"
    assert manifest["command"] == ("python -m stride_viz train-model --pool fortunes+facts --preset tiny "
                                   "--seed 0 --out <folder>")
    assert models._made_by_recipe(folder, "tiny")
    lm = load_model(str(folder), device="cpu")
    assert lm.hash == manifest["weights_hash"]
    assert sum(f.stat().st_size for f in folder.iterdir()) < 8 << 20     # a small checkpoint
