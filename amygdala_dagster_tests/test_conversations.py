"""Evaluation on labelled conversations (per-token, as the runtime reads them) and the report's runtime section."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from amygdala_dagster.data import conversation_snippets_path
from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.inputs import InputRecord, read_inputs
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.evaluation.conversations import evaluate_conversations, sample_scores
from amygdala_dagster.evaluation.runtime_report import PLOT, runtime_html, runtime_markdown, runtime_plots
from amygdala_dagster.readout.manifest import load_readout, write_readout
from amygdala_dagster.readout.runtime import ReadoutRuntime
from amygdala_dagster.readout.vectors import TrainedReadout
from amygdala_dagster.workflow.samples import conversation_sample

EMOTIONS = ["anxiety", "awe", "calm", "clarity", "curiosity", "determination", "embarrassment", "frustration",
            "gratitude", "joy", "loneliness", "love", "pride", "sadness", "tiredness", "warmth"]


def test_bundled_snippets_are_labelled_with_the_sample_emotions():
    records = read_inputs(conversation_snippets_path(), labelled=True)
    assert len(records) == 60
    labels = [set(r.emotions) for r in records]
    assert set().union(*labels) == set(EMOTIONS)  # every sample emotion has conversations with it
    assert sum(1 for lab in labels if not lab) >= 10  # and neutral ones without any
    for e in EMOTIONS:
        assert sum(e in lab for lab in labels) >= 2


@pytest.fixture(scope="module")
def minilm_readout(tmp_path_factory):
    """A readout on MiniLM whose 'joy' row points at the mean activation of joyful minus neutral text."""
    tmp = tmp_path_factory.mktemp("conv")
    loaded = load_model("minilm", device="cpu")
    rt = ReadoutRuntime(loaded.model, loaded.tokenizer, None, layers=[4])
    happy = ["I am so happy today, everything went wonderfully!", "What a joyful, delightful surprise, thank you!"]
    plain = ["The meeting is at ten in room four.", "Convert the file to CSV and upload it."]
    enc = [rt.encode(t) for t in happy + plain]
    means = {i: h[:, 0].mean(axis=0) for i, h in rt.hidden_states(enc)}
    d = np.mean([means[0], means[1]], axis=0) - np.mean([means[2], means[3]], axis=0)
    rng = np.random.default_rng(0)
    other = rng.normal(size=d.shape)
    vec = np.stack([d / np.linalg.norm(d), other / np.linalg.norm(other)]).astype(np.float32)
    ro = TrainedReadout(concepts=["joy", "noise"], layers=[4], vectors={4: vec},
                        raw_norms={"joy": [1.0], "noise": [1.0]}, counts={"joy": {}, "noise": {}})
    scores = [s.raw[4] for s in ReadoutRuntime(loaded.model, loaded.tokenizer, type("R", (), {
        "concepts": ["joy", "noise"], "layers": [4], "vectors": {4: vec}, "manifest": {"concepts": ["joy", "noise"]}})()
    ).score_many(plain)]
    vals = np.concatenate([s[1:-1] for s in scores])
    tc = {c: {4: {"source": "test", "skip_first_tokens": 1, "n_texts": 2, "n_tokens": len(vals),
                  "neg_mean": float(vals[:, i].mean()), "neg_std": float(vals[:, i].std(ddof=1)), "quantiles": {},
                  "target_rate": 0.01, "threshold": float(vals[:, i].max())}} for i, c in enumerate(["joy", "noise"])}
    write_readout(tmp / "v.safetensors", tmp / "m.json", ro, model="minilm", model_revision=None, dtype="float32",
                  pooling="mean", layer_path=None, fingerprint=None, training={}, calibration=None,
                  token_calibration=tc)
    return loaded, load_readout(tmp / "v.safetensors", tmp / "m.json")


def test_conversation_metrics_and_runtime_section(minilm_readout, tmp_path):
    loaded, readout = minilm_readout
    records = [
        InputRecord("a", "I am thrilled and so happy, this is wonderful news!", ["joy"]),
        InputRecord("b", [{"role": "user", "content": "Yay! We won, I'm overjoyed."}], ["joy", "mystery"]),
        InputRecord("c", "Please send the quarterly invoice to accounting.", []),
        InputRecord("d", "The bus leaves at seven from platform two.", []),
    ]
    engine = ActivationEngine(loaded, [4], max_tokens=128)
    sample = conversation_sample(engine.tokenizer, engine.max_tokens, records, "test.jsonl")
    tokens = TokenCache(tmp_path / "cache", engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(tmp_path / "cache", engine.fingerprint) as cache:
        run = ensure_cached(engine, cache, [], progress=False, tokens=tokens, sequences=sample.sequences)
    assert (run.sequences, run.sequences_forwarded, engine.stats.texts) == (4, 4, 4)  # one forward each
    scores = sample_scores(sample, tokens, readout, [4])
    out = evaluate_conversations(scores, [e.emotions for e in sample.entries], readout, source="test.jsonl")
    joy = out["per_emotion"]["joy"]
    assert set(joy) >= {"text_auroc", "token_auroc", "fire_rate_without", "first_fire_median", "n_with", "n_without"}
    assert joy["n_with"] == 2 and joy["n_without"] == 2
    assert joy["text_auroc"] == 1.0 and joy["token_auroc"] == 1.0
    thr = readout.manifest["per_concept"]["joy"]["layers"]["4"]["token_calibration"]["threshold"]
    fires = [bool((s.scored & (s.raw[4][:, 0] >= thr)).any()) for s in scores]
    assert joy["fire_rate_without"] == np.mean(fires[2:])
    firsts = [int(np.flatnonzero(s.scored & (s.raw[4][:, 0] >= thr))[0]) for s, f in zip(scores[:2], fires) if f]
    assert joy["first_fire_median"] == (float(np.median(firsts)) if firsts else None)
    assert out["unknown_labels"] == ["mystery"] and out["n_conversations"] == 4
    assert [t["id"] for t in out["traces"]] == ["a", "b", "c"][:len(out["traces"])] \
        and out["traces"][0]["labels"] == ["joy"]
    ev = {"conversations": json.loads(json.dumps(out))}
    plots = runtime_plots(ev)
    assert plots[PLOT][:8] == b"\x89PNG\r\n\x1a\n"
    page = runtime_html(ev, plots)
    assert "Runtime: per-token readout on conversations" in page and page.count('<section class="conv">') == 2
    assert "| joy | 4 | 2 | 2 | 1.00 | 1.00 |" in runtime_markdown(ev)
    assert runtime_html({}, {}) == "" and runtime_plots({}) == {} and runtime_markdown({}) == ""
    # A bidirectional control in a conversation's text or id is shown as a marker, never raw.
    rec = ev["conversations"]["traces"][0]
    rec["id"], rec["tokens"][1] = "a\u202eb", "\u2066" + rec["tokens"][1]
    page = runtime_html(ev, plots)
    assert "\u202e" not in page and "\u2066" not in page
    text = re.sub(r"<[^>]+>", "", page)
    assert "a⟨U+202E⟩b (labelled: joy)" in text and "⟨U+2066⟩" in text


def test_runtime_plot_stays_a_readable_size_at_200_emotions():
    rng = np.random.default_rng(0)
    per = {f"e{i:03d}": {"layer": 4, "n_with": 3, "n_without": 57, "text_auroc": float(rng.uniform(0.4, 1)),
                         "token_auroc": float(rng.uniform(0.4, 1)), "fire_rate_without": float(rng.uniform(0, 1)),
                         "fire_rate_with": 1.0, "first_fire_median": 5.0} for i in range(200)}
    png = runtime_plots({"conversations": {"per_emotion": per}})[PLOT]
    width, height = Image.open(io.BytesIO(png)).size
    assert width <= 1200 and height <= 800, (width, height)


def test_episode_rule_on_conversations_with_intervals_and_verdict_flags(minilm_readout, tmp_path):
    from amygdala_dagster.evaluation.verdicts import Criteria, _episode_flags
    from amygdala_dagster.readout.metrics import wilson_interval

    loaded, readout = minilm_readout
    manifest = json.loads(readout.manifest_path.read_text())
    for c, thr in (("joy", 0.0), ("noise", 1e6)):
        manifest["per_concept"][c]["layers"]["4"]["episode"] = {
            "statistic": "ewm", "half_life_tokens": 16.0, "min_tokens": 3, "skip_first_tokens": 1,
            "false_alarm_rate": 0.05, "threshold": thr, "threshold_z": 1.0}
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    readout = load_readout(readout.vectors_path, tmp_path / "m.json")
    happy = ["I am thrilled and so happy, this is wonderful news!", "Yay! We won the cup, I'm overjoyed today.",
             "What a delightful, joyful morning with my whole family!"]
    plain = ["Please send the quarterly invoice to accounting.", "The bus leaves at seven from platform two.",
             "Set the timeout to thirty seconds in the config file.", "The form needs a signature on page three."]
    records = [InputRecord(f"h{i}", t, ["joy"]) for i, t in enumerate(happy)] + \
        [InputRecord(f"p{i}", t, []) for i, t in enumerate(plain)]
    engine = ActivationEngine(loaded, [4], max_tokens=128)
    sample = conversation_sample(engine.tokenizer, engine.max_tokens, records, "test.jsonl")
    tokens = TokenCache(tmp_path / "cache", engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(tmp_path / "cache", engine.fingerprint) as cache:
        ensure_cached(engine, cache, [], progress=False, tokens=tokens, sequences=sample.sequences)
    scores = sample_scores(sample, tokens, readout, [4])
    out = evaluate_conversations(scores, [e.emotions for e in sample.entries], readout, bootstrap=50)
    ep = out["per_emotion"]["joy"]["episode"]
    fired = [bool(s.episode[4].fired[0]) for s in scores]
    assert (ep["n_with"], ep["n_without"]) == (3, 4)
    assert ep["n_fired_with"] == sum(fired[:3]) and ep["n_fired_without"] == sum(fired[3:])
    assert ep["hit_rate"] == sum(fired[:3]) / 3 and ep["false_alarm_rate"] == sum(fired[3:]) / 4
    assert ep["false_alarm_ci"] == pytest.approx(wilson_interval(sum(fired[3:]), 4))
    assert ep["auroc"] == 1.0 and ep["auroc_ci"] is not None and ep["target_rate"] == 0.05
    # the score is the rule's statistic at the end of each conversation
    ends = [float(s.episode[4].score[0]) for s in scores]
    assert min(ends[:3]) > max(ends[3:])
    noise = out["per_emotion"]["noise"]["episode"]
    assert noise["n_fired_with"] == noise["n_fired_without"] == 0  # a threshold nothing reaches
    assert out["summary"]["mean_episode_auroc"] is not None
    ev = {"conversations": json.loads(json.dumps(out))}
    md = runtime_markdown(ev)
    assert "episode AUROC [95% CI]" in md and "episode false alarms [95% CI]" in md
    assert "episode rule reads an exponentially weighted mean" in md
    page = runtime_html(ev, runtime_plots(ev))
    assert "episode hits [95% CI]" in page
    # the verdict reads the rates through their intervals: 3 of 60 is not above 5%, 20 of 60 is
    crit = Criteria()
    base = {"target_rate": 0.05, "n_with": 10, "n_without": 60, "n_fired_with": 8, "hit_rate": 0.8,
            "hit_ci": wilson_interval(8, 10), "auroc": 0.9}
    quiet = dict(base, n_fired_without=3, false_alarm_rate=0.05, false_alarm_ci=wilson_interval(3, 60))
    assert _episode_flags("joy", quiet, crit) == []
    loud = dict(base, n_fired_without=20, false_alarm_rate=1 / 3, false_alarm_ci=wilson_interval(20, 60))
    assert [f["kind"] for f in _episode_flags("joy", loud, crit)] == ["episode_false_alarms"]
    deaf = dict(quiet, n_with=20, n_fired_with=0, hit_rate=0.0, hit_ci=wilson_interval(0, 20), auroc=0.6,
                auroc_ci=[0.5, 0.7])
    assert [f["kind"] for f in _episode_flags("joy", deaf, crit)] == ["episode_auroc", "episode_hits"]
    assert _episode_flags("joy", deaf, Criteria(min_episode_auroc=0.5, min_episode_hit_rate=0.0)) == []
