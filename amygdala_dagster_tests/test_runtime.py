"""The runtime reference (per-token readout on a real model) and the token calibration in the manifest."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.inputs import InputError, encode, read_inputs
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.readout.folds import text_folds
from amygdala_dagster.readout.manifest import calibration_entry, load_readout, write_readout
from amygdala_dagster.readout.metrics import z_score
from amygdala_dagster.readout.runtime import ReadoutRuntime, scored_mask
from amygdala_dagster.readout.token_calibration import (
    calibrate_readout,
    calibrate_tokens,
    calibration_entries,
    heldout_problems,
)
from amygdala_dagster.readout.vectors import TrainedReadout
from amygdala_dagster.workflow.samples import calibration_sample
from amygdala_dagster_tests.tiny_models import HIDDEN, build_tiny_model, random_readout

LAYERS = [1, 2]
CONCEPTS = ["anger", "calm", "joy"]
TEXTS = ["The old journal entry spoke of warmth and quiet clarity after a long week of work.",
         "Anger flared when the server crashed again, then faded into a stubborn determination.",
         "curious"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _readout(h: int = HIDDEN, layers=LAYERS, seed: int = 0) -> TrainedReadout:
    return random_readout(CONCEPTS, layers, h, seed)


def _token_cal(mean: float, std: float) -> dict:
    return {"source": "test", "skip_first_tokens": 1, "n_texts": 3, "n_tokens": 30, "neg_mean": mean,
            "neg_std": std, "quantiles": {}, "target_rate": 0.01, "threshold": mean + 2 * std}


def _pair(tmp_path: Path, h: int = HIDDEN, layers=LAYERS, token_calibration=None):
    ro = _readout(h, layers)
    tc = token_calibration or (
        {c: {layer: _token_cal(0.1 * i, 0.5 + i) for layer in layers} for i, c in enumerate(CONCEPTS)})
    v, m = tmp_path / "vectors.safetensors", tmp_path / "manifest.json"
    write_readout(v, m, ro, model="tiny", model_revision=None, dtype="float32", pooling="mean", layer_path=None,
                  fingerprint=None, training={}, calibration=None, token_calibration=tc)
    return load_readout(v, m)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Qwen3 decoder with its LM head and a tokenizer that has a chat template."""
    src = Path(build_tiny_model("qwen3"))
    path = tmp_path_factory.mktemp("chat") / "qwen3-chat"
    shutil.copytree(src, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_generation_rows_equal_the_offline_projection(arch, tmp_path):
    path = build_tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    readout = _pair(tmp_path)
    rt = ReadoutRuntime(model, tok, readout)
    rows = list(rt.generate(TEXTS[0], max_new_tokens=7, do_sample=False))
    prompt = rt.encode(TEXTS[0], add_generation_prompt=True).ids
    assert [r.position for r in rows] == list(range(len(prompt), len(prompt) + 7))
    seq = prompt + [r.token_id for r in rows]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    for r in rows:
        for layer in LAYERS:  # residual stream after block idx = hidden_states[idx + 1]
            offline = hs[layer + 1][0, r.position].numpy() @ readout.vectors[layer].T
            np.testing.assert_allclose(r.raw[layer], offline, atol=1e-5)
            for c, concept in enumerate(CONCEPTS):
                cal = calibration_entry(readout.manifest, concept, layer, "token")
                assert r.calibrated[layer][c] == \
                    pytest.approx(float(z_score(r.raw[layer][c], cal["neg_mean"], cal["neg_std"])))
    # the prompt's rows come from the prefill, as scoring the prompt gives them
    prefill = rt.score_many([TEXTS[0]])[0]
    for layer in LAYERS:
        np.testing.assert_allclose(prefill.raw[layer],
                                   hs[layer + 1][0, : prefill.raw[layer].shape[0]].numpy() @ readout.vectors[layer].T,
                                   atol=1e-5)


def test_closing_the_generator_stops_generation(chat_model, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(chat_model).eval()
    rt = ReadoutRuntime(model, AutoTokenizer.from_pretrained(chat_model), _pair(tmp_path))
    gen = rt.generate([{"role": "user", "content": "hello"}], max_new_tokens=50, do_sample=False)
    first = next(gen)
    gen.close()
    assert first.position > 0
    assert not any(getattr(m, "_forward_hooks", None) for m in rt._modules)  # hooks removed


@pytest.mark.parametrize("arch", ["qwen3", "gpt2", "minilm"])
def test_prefill_equals_offline_projection_and_the_pooled_training_activation(arch, tmp_path):
    source = "minilm" if arch == "minilm" else build_tiny_model(arch)
    loaded = load_model(source, device="cpu")
    layers = [3, 4] if arch == "minilm" else LAYERS
    readout = _pair(tmp_path, loaded.hidden_size, layers)
    engine = ActivationEngine(loaded, layers, pooling="mean")
    rt = ReadoutRuntime.from_loaded(loaded, readout, max_tokens=engine.max_tokens, batch_size=2)
    scores = rt.score_many(TEXTS)
    order, acts = [], []
    for idx, p in engine.forward(TEXTS):
        order += idx
        acts.append(p)
    acts = torch.cat(acts).numpy()[np.argsort(order)]
    enc = loaded.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        hs = loaded.model(**enc, output_hidden_states=True).hidden_states
    for s, layer in enumerate(layers):
        if layer + 1 < len(hs) - 1 or arch == "minilm":  # the last block's output is reported after the final norm
            np.testing.assert_allclose(scores[0].raw[layer], hs[layer + 1][0].numpy() @ readout.vectors[layer].T,
                                       atol=1e-5)
        for i in range(len(TEXTS)):
            # training's mean-pooled projection is the mean of the runtime's per-token scores
            np.testing.assert_allclose(scores[i].raw[layer].mean(axis=0), acts[i, s] @ readout.vectors[layer].T,
                                       atol=1e-5)


def test_messages_go_through_the_chat_template(chat_model):
    tok = AutoTokenizer.from_pretrained(chat_model)
    messages = [{"role": "user", "content": "the rain was soft"}, {"role": "assistant", "content": "and the tea hot"}]
    enc = encode(tok, messages)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert enc.ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert enc.special[0] and sum(enc.special) == 4  # <s> ... </s> per message
    mask = scored_mask(enc, 1)
    assert not mask[0] and not any(mask[i] for i, s in enumerate(enc.special) if s)
    # a tokenizer without a template: role-prefixed lines
    plain = encode(AutoTokenizer.from_pretrained(build_tiny_model("llama")), messages)
    assert len(plain.ids) > 4


def test_read_inputs_validates_each_line(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"text": "hello"}\n{"id": "b", "messages": [{"role": "user", "content": "hi"}], "emotions": []}\n')
    recs = read_inputs(p)
    assert [r.id for r in recs] == ["1", "b"] and recs[1].item[0]["content"] == "hi"
    for bad, msg in [('{"text": ""}', "empty text"), ('{"text": "a", "messages": []}', "exactly one"),
                     ('{"messages": [{"role": 1}]}', "message 0"), ("[1]", "JSON object"), ("{", "not valid JSON")]:
        p.write_text(bad + "\n")
        with pytest.raises(InputError, match=f"in.jsonl:1: .*{msg}"):
            read_inputs(p)
    p.write_text('{"text": "a"}\n')
    with pytest.raises(InputError, match="emotions"):
        read_inputs(p, labelled=True)


def test_token_threshold_fires_at_its_target_rate_on_unseen_texts():
    rng = np.random.default_rng(0)
    values = [rng.normal(1.0, 2.0, size=rng.integers(50, 150)) for _ in range(60)]
    keys = [f"t{i}" for i in range(60)]
    cal = calibrate_tokens(values, keys, source="holdout_negatives", skip_first_tokens=1, target_rate=0.02)
    x = np.concatenate(values)
    assert cal["n_tokens"] == x.size and cal["n_texts"] == 60
    assert cal["neg_mean"] == pytest.approx(x.mean()) and cal["neg_std"] == pytest.approx(x.std(ddof=1))
    assert np.mean(x >= cal["threshold"]) == pytest.approx(0.02, abs=1e-3)
    assert cal["quantiles"]["0.5"] < cal["quantiles"]["0.9"] < cal["quantiles"]["0.99"] < cal["quantiles"]["0.999"]
    assert 0.5 < cal["heldout"]["ratio_to_target"] < 2 and cal["heldout"]["enough_tokens"]
    assert heldout_problems({"c": {3: cal}}) == []
    # folds depend on the texts' content, not their order
    assert list(text_folds(keys[::-1])) == list(text_folds(keys)[::-1])
    # a threshold that fires far too often on held-out texts is reported
    bad = dict(cal, heldout=dict(cal["heldout"], fire_rate=0.1, ratio_to_target=5.0))
    assert "5.0x the target" in heldout_problems({"c": {3: bad}})[0]


def test_calibration_reads_stored_token_activations_without_a_model(tmp_path):
    """The GPU step keeps the calibration sample per token; calibration projects it, no model involved, and
    its numbers are those of the runtime's per-token scores at the scored positions."""
    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    readout = _readout()
    engine = ActivationEngine(loaded, LAYERS, max_tokens=64)
    sample = calibration_sample(engine.tokenizer, engine.max_tokens, 10_000,
                                holdout=[(f"k{i}", t) for i, t in enumerate(TEXTS)])
    tokens = TokenCache(tmp_path, engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(tmp_path, engine.fingerprint) as cache:
        first_run = ensure_cached(engine, cache, TEXTS, progress=False, tokens=tokens, sequences=sample.sequences)
        assert (first_run.forwarded, first_run.sequences_forwarded, engine.stats.texts) == (3, 3, 3)  # one each
        again = ensure_cached(engine, cache, TEXTS, progress=False, tokens=tokens, sequences=sample.sequences)
        assert (again.forwarded, again.sequences_forwarded, engine.stats.texts) == (0, 0, 3)
    entries = {c: list(sample.entries) for c in CONCEPTS}
    first = calibrate_readout(readout, entries, tokens, hidden_layers=LAYERS, target_rate=0.1)
    assert json.dumps(calibrate_readout(readout, entries, tokens, hidden_layers=LAYERS, target_rate=0.1)) == \
        json.dumps(first)
    entry = first["joy"][2]
    rt = ReadoutRuntime(loaded.model, loaded.tokenizer, type("R", (), {
        "concepts": CONCEPTS, "layers": LAYERS, "vectors": readout.vectors, "manifest": {"concepts": CONCEPTS}})())
    vals = np.concatenate([s.raw[2][s.scored, 2] for s in rt.score_many(TEXTS)])
    assert entry["n_tokens"] == vals.size == sum(len(encode(loaded.tokenizer, t).ids) - 1 for t in TEXTS)
    # per-token activations are kept in 16 bits: the statistics agree to that precision
    assert entry["neg_mean"] == pytest.approx(vals.mean(), abs=2e-3 * float(np.abs(vals).max()))
    assert entry["threshold"] == pytest.approx(np.quantile(vals, 0.9), abs=2e-3 * float(np.abs(vals).max()))


def test_calibration_sample_is_bounded_by_its_token_budget(tmp_path):
    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    texts = [(f"k{i}", f"text number {i} about the weather and the long evening walk home") for i in range(40)]
    full = calibration_sample(loaded.tokenizer, 64, 100_000, holdout=texts)
    small = calibration_sample(loaded.tokenizer, 64, 60, holdout=texts)
    assert len(full.entries) == 40 and full.left_out == 0
    assert 0 < small.tokens <= 60 and small.left_out == 40 - len(small.entries) > 0
    # a stable order: the small sample is the start of the full one, whatever order the candidates came in
    again = calibration_sample(loaded.tokenizer, 64, 60, holdout=texts[::-1])
    assert small.keys() == again.keys() == full.keys()[: len(small.entries)]


def test_manifest_format_3_carries_token_calibration_and_formats_1_and_2_still_read(tmp_path):
    from amygdala_dagster.commands.inspect import format_report, inspect_pair

    readout = _pair(tmp_path)
    m = readout.manifest
    assert m["format_version"] == 3
    shown = inspect_pair(readout.vectors_path, readout.manifest_path)
    assert shown["ok"] and shown["token_calibration"]["1"]["n_concepts"] == 3
    assert "manifest: format 3; token calibration: per layer below\n  layer 1: 3 concepts" in format_report(shown)
    for c in CONCEPTS:
        for layer in LAYERS:
            entry = m["per_concept"][c]["layers"][str(layer)]
            assert set(entry) >= {"calibration", "token_calibration", "episode"}
            assert calibration_entry(m, c, layer, "token")["threshold"] == entry["token_calibration"]["threshold"]
    old = json.loads(readout.manifest_path.read_text())
    old["format_version"] = 2
    for per in old["per_concept"].values():
        for entry in per["layers"].values():
            del entry["episode"]
    readout.manifest_path.write_text(json.dumps(old))
    v2 = load_readout(readout.vectors_path, readout.manifest_path)
    assert calibration_entry(v2.manifest, "joy", 1, "episode") is None
    assert "episode rule: none" in format_report(inspect_pair(readout.vectors_path, readout.manifest_path))
    old["format_version"] = 1
    for per in old["per_concept"].values():
        for entry in per["layers"].values():
            del entry["token_calibration"]
    readout.manifest_path.write_text(json.dumps(old))
    v1 = load_readout(readout.vectors_path, readout.manifest_path)
    shown = inspect_pair(readout.vectors_path, readout.manifest_path)
    assert shown["ok"] and shown["token_calibration"] is None
    assert "format 1; token calibration: none" in format_report(shown)
    assert calibration_entry(v1.manifest, "joy", 1, "token") is None
    rt_scores = np.zeros((2, 3))
    from amygdala_dagster.readout.runtime import calibrated_scores

    assert np.isnan(calibrated_scores(rt_scores, v1.manifest, 1, "token")).all()


def test_calibration_texts_replace_the_holdout_negatives_and_say_so(tmp_path):
    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    p = tmp_path / "traffic.jsonl"
    p.write_text('{"text": "hello there"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    sample = calibration_sample(loaded.tokenizer, 64, 1000, records=read_inputs(p), records_name=p.name)
    entries, source = calibration_entries(sample, {}, CONCEPTS)
    assert source == {c: "calibration_texts:traffic.jsonl" for c in CONCEPTS}
    assert [e.id for e in entries["joy"]] == ["1", "2"] and entries["joy"][0].text_sha is not None
    assert entries["joy"][1].text_sha is None  # a conversation has no pooled row


def test_run_refuses_a_missing_calibration_file_in_one_line(tmp_path, capsys):
    from amygdala_dagster.commands.cli import main

    assert main(["run", "--calibration-texts", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path)]) == 2
    assert "--calibration-texts" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_per_token_cache_on_an_fsspec_url_stays_there(tmp_path, monkeypatch):
    """`--cache-dir s3://...`: the per-token cache lives beside the pooled one in the store, not in a
    local folder named after the URL (Path() folded ``memory://b`` into ``memory:/b``)."""
    import fsspec

    monkeypatch.chdir(tmp_path)
    cache = TokenCache("memory://amygdala-test/cache", {"model": "m"}, "bfloat16")
    hidden = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    assert "ab12" not in cache
    cache.put("ab12", hidden)
    assert "ab12" in cache and np.array_equal(cache.get("ab12"), hidden)  # small integers: exact in bf16
    assert fsspec.filesystem("memory").find("/amygdala-test/cache/tokens")
    assert not list(tmp_path.iterdir())  # nothing written under the current directory
    local = TokenCache(tmp_path / "c", {"model": "m"})
    local.put("cd34", hidden)
    assert np.array_equal(local.get("cd34"), hidden) and list((tmp_path / "c" / "tokens").rglob("cd34.safetensors"))


def test_per_token_cache_prunes_what_no_sample_uses_once_old(tmp_path):
    cache = TokenCache(tmp_path, {"model": "m"})
    for key in ("aa", "bb", "cc"):
        cache.put(key, np.ones((2, 1, 3), np.float32))
    assert cache.prune(["aa"]) == 0  # fresh files may belong to a run still going on
    freed = cache.prune(["aa"], now=time.time() + 2 * 86400)
    assert freed > 0 and set(cache.keys()) == {"aa"}
    with pytest.raises(KeyError, match="materialize activation_stats"):
        cache.get("bb")


def test_a_long_calibration_text_is_cut_and_the_cut_is_counted(tmp_path, caplog):
    """Issue "Reliability round 2" §4: a 5 MB calibration text was cut to the token limit without a word; the
    sample, the log line and every token_calibration entry now say how many texts were cut."""
    import logging

    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    engine = ActivationEngine(loaded, LAYERS, max_tokens=64)
    huge = "The evening was calm and the rain kept falling. " * 100_000  # ~5 MB
    p = tmp_path / "traffic.jsonl"
    p.write_text(json.dumps({"text": huge}) + "\n" + json.dumps({"text": TEXTS[0]}) + "\n")
    with caplog.at_level(logging.INFO, logger="amygdala_dagster"):
        sample = calibration_sample(engine.tokenizer, engine.max_tokens, 10_000, records=read_inputs(p),
                                    records_name=p.name)
    assert [e.truncated for e in sample.entries] == [True, False] and sample.summary()["truncated"] == 1
    assert "1 cut to the token limit" in caplog.text
    tokens = TokenCache(tmp_path / "cache", engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(tmp_path / "cache", engine.fingerprint) as cache:
        ensure_cached(engine, cache, [], progress=False, tokens=tokens, sequences=sample.sequences)
    entries, source = calibration_entries(sample, {}, CONCEPTS)
    cal = calibrate_readout(_readout(), entries, tokens, hidden_layers=LAYERS, source=source, target_rate=0.1)
    assert {cal[c][layer]["n_truncated_texts"] for c in CONCEPTS for layer in LAYERS} == {1}
    assert len(sample.entries[0]) == 64  # what the runtime reads of it: the first max_tokens tokens
