"""The episode rule (Contract 3 ``episode``): its statistic, its calibration, and the runtime applying it per token."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.inputs import read_inputs
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.readout.episode import (
    EpisodeState,
    calibrate_episode,
    conformal_threshold,
    decay,
    episode_problems,
    peak,
    statistic,
)
from amygdala_dagster.readout.manifest import calibration_entry, load_readout, write_readout
from amygdala_dagster.readout.runtime import ReadoutRuntime, scored_mask
from amygdala_dagster.readout.token_calibration import (
    calibrate_episodes,
    calibrate_readout,
    calibration_entries,
    project_calibration,
)
from amygdala_dagster.readout.vectors import TrainedReadout
from amygdala_dagster.workflow.samples import calibration_sample
from amygdala_dagster_tests.tiny_models import HIDDEN, build_tiny_model, random_readout

LAYERS = [1, 2]
CONCEPTS = ["anger", "calm", "joy"]
TEXTS = ["The old journal entry spoke of warmth and quiet clarity after a long week of work.",
         "Anger flared when the server crashed again, then faded into a stubborn determination.",
         "A slow walk by the river at dusk, the water flat and grey, nobody else out."]


def _readout(h: int = HIDDEN, seed: int = 0) -> TrainedReadout:
    return random_readout(CONCEPTS, LAYERS, h, seed)


def _rule(threshold: float, half_life: float | None = 4.0, min_tokens: int = 3) -> dict:
    return {"statistic": "ewm", "half_life_tokens": half_life, "min_tokens": min_tokens, "skip_first_tokens": 1,
            "source": "test", "n_texts": 30, "n_short_texts": 0, "median_scored_tokens": 20.0,
            "false_alarm_rate": 0.05, "threshold": threshold, "threshold_z": None, "order_statistic": 29,
            "rate_bound": 1 / 31, "heldout": None}


def _pair(tmp_path: Path, thresholds: dict[str, float], half_life: float | None = 4.0):
    ro = _readout()
    tc = {c: {layer: {"source": "t", "skip_first_tokens": 1, "n_texts": 3, "n_tokens": 30, "neg_mean": 0.0,
                  "neg_std": 1.0, "quantiles": {}, "target_rate": 0.01, "threshold": 2.0} for layer in LAYERS}
          for c in CONCEPTS}
    ep = {c: {layer: _rule(t, half_life) for layer in LAYERS} for c, t in thresholds.items()}
    v, m = tmp_path / "vectors.safetensors", tmp_path / "manifest.json"
    write_readout(v, m, ro, model="tiny", model_revision=None, dtype="float32", pooling="mean", layer_path=None,
                  fingerprint=None, training={}, calibration=None, token_calibration=tc, episode=ep)
    return load_readout(v, m)


# ----------------------------------------------------------------------------- the statistic
@pytest.mark.parametrize("half_life", [None, 1.0, 16.0, 128.0])
def test_the_streaming_state_gives_the_statistic_of_the_whole_sequence_in_any_chunks(half_life):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    scored = np.ones(40, dtype=bool)
    scored[[0, 7, 8, 30]] = False  # special tokens and the first position leave the state as it is
    whole = statistic(x[scored], half_life)
    w = decay(half_life)
    # the definition in the contract, spelled out
    num = den = 0.0
    ref = []
    for v in x[scored, 1]:
        num, den = w * num + v, w * den + 1
        ref.append(num / den)
    np.testing.assert_allclose(whole[:, 1], ref, rtol=1e-12)
    for cuts in ([40], [1, 39], [5, 3, 1, 31], [1] * 40):
        state = EpisodeState(np.full(3, w), np.full(3, 4), np.full(3, 0.3))
        stats, pos = [], 0
        for n in cuts:
            s, _ = state.update(x[pos:pos + n], scored[pos:pos + n])
            stats.append(s)
            pos += n
        stat = np.vstack(stats)
        np.testing.assert_allclose(stat[scored], whole, rtol=1e-10, atol=1e-12)
        assert np.isnan(stat[0]).all()  # nothing scored yet
        np.testing.assert_allclose(stat[8], stat[6])  # unscored positions carry the last value
        # the rule decides from the 4th scored token on, and stays fired from its first active token
        deciding = np.cumsum(scored) >= 4
        active = deciding[:, None] & scored[:, None] & (np.nan_to_num(stat, nan=-np.inf) >= 0.3)
        first = [int(np.flatnonzero(active[:, c])[0]) if active[:, c].any() else -1 for c in range(3)]
        assert list(state.first) == first and list(state.fired) == [f >= 0 for f in first]
        np.testing.assert_allclose(state.score, whole[-1])
        np.testing.assert_allclose(state.peak, [peak(x[scored, c], half_life, 4) for c in range(3)])


def test_half_life_is_checked():
    with pytest.raises(ValueError, match="half-life"):
        decay(0)
    assert decay(None) == 1.0 and decay(1.0) == 0.5


# ----------------------------------------------------------------------------- calibration
def test_conformal_threshold_keeps_the_false_alarm_rate_on_new_episodes():
    thr, k, bound = conformal_threshold(list(range(100)), 0.05)
    assert (k, thr) == (96, 95.0) and bound == pytest.approx(5 / 101)
    # too few episodes to guarantee 5%: the largest peak, and no bound claimed
    assert conformal_threshold(list(range(10)), 0.05) == (9.0, 10, None)
    rng = np.random.default_rng(0)
    fires = []
    for _ in range(400):
        cal, new = rng.normal(size=60), rng.normal(size=200)
        fires.append(np.mean(new >= conformal_threshold(cal, 0.05)[0]))
    assert np.mean(fires) <= 0.05


def test_calibrate_episode_records_its_definition_and_heldout_rate():
    rng = np.random.default_rng(3)
    values = [rng.normal(size=int(n)) for n in rng.integers(40, 200, size=80)] + [rng.normal(size=10)] * 3
    keys = [f"t{i}" for i in range(len(values))]
    rule = calibrate_episode(values, keys, source="src", skip_first_tokens=1, half_life_tokens=64.0, min_tokens=32,
                             false_alarm_rate=0.1, token_calibration={"neg_mean": 0.5, "neg_std": 2.0})
    assert rule["n_texts"] == 80 and rule["n_short_texts"] == 3  # shorter than min_tokens: they never fire
    peaks = sorted(peak(v, 64.0, 32) for v in values[:80])
    assert rule["threshold"] == peaks[math.ceil(0.9 * 81) - 1]
    assert rule["threshold_z"] == pytest.approx((rule["threshold"] - 0.5) / 2.0)
    held = rule["heldout"]
    assert held["n_texts"] == 80 and 0 <= held["false_alarm_rate"] <= 0.25
    assert held["ratio_to_target"] == pytest.approx(held["false_alarm_rate"] / 0.1)
    assert calibrate_episode([rng.normal(size=5)], ["x"], source="s", skip_first_tokens=1, min_tokens=32) is None
    with pytest.raises(ValueError, match="false-alarm rate"):
        calibrate_episode(values, keys, source="s", skip_first_tokens=1, false_alarm_rate=0.0)
    # held-out false alarms above the target beyond the 95% interval are reported; a few are not
    many = dict(rule, heldout=dict(held, n_fired=30, false_alarm_rate=30 / 80))
    assert "30 of 80 held-out calibration episodes" in episode_problems({"joy": {3: many}})[0]
    few = dict(rule, heldout=dict(held, n_fired=12, false_alarm_rate=12 / 80))
    assert episode_problems({"joy": {3: few}, "calm": {3: None}}) == []


def test_episode_rules_come_from_the_stored_per_token_activations_and_leave_out_labelled_records(tmp_path, caplog):
    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    readout = _readout()
    engine = ActivationEngine(loaded, LAYERS, max_tokens=64)
    path = tmp_path / "cal.jsonl"
    lines = [{"id": f"r{i}", "text": f"{t} Then another sentence, number {i}, about the evening."}
             for i, t in enumerate(TEXTS * 4)]
    for rec in lines[:3]:
        rec["emotions"] = ["joy"]  # an episode with joy: it sets no rule of joy
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    sample = calibration_sample(engine.tokenizer, engine.max_tokens, 10_000, records=read_inputs(path),
                                records_name="cal.jsonl")
    assert [e.emotions for e in sample.entries[:4]] == [["joy"]] * 3 + [None]
    tokens = TokenCache(tmp_path, engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(tmp_path, engine.fingerprint) as cache:
        ensure_cached(engine, cache, [], progress=False, tokens=tokens, sequences=sample.sequences)
    entries, source = calibration_entries(sample, {}, CONCEPTS)
    proj = project_calibration(readout, entries, tokens, hidden_layers=LAYERS)
    token_cal = calibrate_readout(readout, entries, tokens, hidden_layers=LAYERS, projections=proj, source=source)
    # the shared projections give the token calibration it gave before
    assert json.dumps(token_cal) == json.dumps(calibrate_readout(readout, entries, tokens, hidden_layers=LAYERS,
                                                                 source=source))
    rules = calibrate_episodes(proj, token_cal, source=source, half_life_tokens=8.0, min_tokens=5,
                               false_alarm_rate=0.2)
    joy, calm = rules["joy"][2], rules["calm"][2]
    # episodes shorter than min_tokens scored tokens set no rule, and the log says why
    with caplog.at_level(logging.WARNING):
        none = calibrate_episodes(proj, token_cal, source=source, min_tokens=500)
    assert none["joy"] == {1: None, 2: None} and "no episode rule" in caplog.text
    assert joy["source"] == "calibration_texts:cal.jsonl" and joy["n_labelled_left_out"] == 3
    assert (joy["n_texts"], calm["n_texts"], calm["n_labelled_left_out"]) == (9, 12, 0)
    # the rule's numbers are those of the runtime's per-token scores (16-bit activations: to that precision)
    rt = ReadoutRuntime(loaded.model, loaded.tokenizer, type("R", (), {
        "concepts": CONCEPTS, "layers": LAYERS, "vectors": readout.vectors, "manifest": {"concepts": CONCEPTS}})())
    scores = rt.score_many([r["text"] for r in lines], ids=[r["id"] for r in lines])
    peaks = sorted(peak(s.raw[2][s.scored, 1], 8.0, 5) for s in scores)
    k = math.ceil(0.8 * 13)
    scale = max(abs(p) for p in peaks)
    assert calm["order_statistic"] == k and calm["threshold"] == pytest.approx(peaks[k - 1], abs=3e-3 * scale)


# ----------------------------------------------------------------------------- the runtime
@pytest.mark.parametrize("arch", ["qwen3", "gpt2"])
def test_generation_carries_the_episode_state_from_the_prompt_through_every_step(arch, tmp_path):
    path = build_tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    readout = _pair(tmp_path, {"anger": -10.0, "calm": 10.0, "joy": 0.0})
    rt = ReadoutRuntime(model, tok, readout)
    rows = list(rt.generate(TEXTS[0], max_new_tokens=6, do_sample=False))
    prompt = rt.encode(TEXTS[0], add_generation_prompt=True)
    seq = prompt.ids + [r.token_id for r in rows]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
    specials = rt._specials
    scored = np.array([i >= 1 and t not in specials for i, t in enumerate(seq)])
    for layer in LAYERS:
        raw = hs[layer + 1][0].numpy() @ readout.vectors[layer].T
        whole = EpisodeState.from_manifest(readout.manifest, layer).trace(raw, scored)
        for r in rows:
            np.testing.assert_allclose(r.episode[layer], whole.stat[r.position], atol=1e-5)
            np.testing.assert_array_equal(r.episode_active[layer], whole.active[r.position])
            np.testing.assert_array_equal(r.episode_fired[layer], (whole.first >= 0) & (whole.first <= r.position))
        assert list(rows[-1].episode_fired[layer]) == [True, False, bool(whole.fired[2])]
    # over a prefill the same rule comes with the scores
    scores = rt.score(TEXTS[0])
    for layer in LAYERS:
        ep = scores.episode[layer]
        ref = EpisodeState.from_manifest(readout.manifest, layer).trace(
            scores.raw[layer], scored_mask(scores.encoded, 1))
        np.testing.assert_allclose(ep.stat, ref.stat, equal_nan=True)
        assert ep.fired[0] and not ep.fired[1]


def test_a_manifest_without_episode_rules_gives_none(tmp_path):
    readout = _pair(tmp_path, {})
    assert all(calibration_entry(readout.manifest, c, 1, "episode") is None for c in CONCEPTS)
    loaded = load_model(build_tiny_model("qwen3"), device="cpu")
    rt = ReadoutRuntime.from_loaded(loaded, readout)
    assert rt.score(TEXTS[1]).episode == {}
