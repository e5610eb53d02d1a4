"""`amygdala trace`: per-token readout over conversations, as HTML + JSON, on the bundled MiniLM."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from amygdala_dagster.commands.cli import main
from amygdala_dagster.evaluation.html import BIDI_CONTROLS, bidi_marker
from amygdala_dagster.evaluation.trace import moving_average, thresholds
from amygdala_dagster.readout.manifest import write_readout
from amygdala_dagster.readout.vectors import TrainedReadout

H = 384
LAYERS = [3, 4]


def _pair(tmp_path, n_concepts=3, token=True):
    rng = np.random.default_rng(0)
    concepts = [f"c{i:03d}" for i in range(n_concepts)]
    vectors = {layer: (lambda m: (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32))(
        rng.normal(size=(n_concepts, H))) for layer in LAYERS}
    ro = TrainedReadout(concepts=concepts, layers=LAYERS, vectors=vectors,
                        raw_norms={c: [1.0, 1.0] for c in concepts}, counts={c: {} for c in concepts},
                        calibration={c: {layer: {"neg_mean": 0.0, "neg_std": 0.1, "threshold": 0.2} for layer in LAYERS}
                                     for c in concepts})
    tc = {c: {layer: {"source": "test", "skip_first_tokens": 1, "n_texts": 1, "n_tokens": 1, "neg_mean": 0.0,
                  "neg_std": 0.05, "quantiles": {}, "target_rate": 0.01, "threshold": 0.1} for layer in LAYERS}
          for c in concepts} if token else None
    v, m = tmp_path / "vectors.safetensors", tmp_path / "manifest.json"
    write_readout(v, m, ro, model="minilm", model_revision=None, dtype="float32", pooling="mean", layer_path=None,
                  fingerprint={"max_tokens": 128}, training={}, calibration=None, token_calibration=tc)
    return m, concepts


def _inputs(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(
        json.dumps({"id": "a", "text": "I am so grateful for the help <b>yesterday</b>, thank you."}) + "\n"
        + json.dumps({"id": "b", "messages": [{"role": "user", "content": "The build failed again."},
                                               {"role": "assistant", "content": "Let's look at the log."}]}) + "\n")
    return p


def test_trace_writes_readable_html_and_json(tmp_path, capsys):
    m, concepts = _pair(tmp_path)
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--input", str(_inputs(tmp_path)), "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["layer"] == 4 and trace["calibration"] == "token" and trace["concepts"] == concepts
    a, b = trace["conversations"]
    assert a["id"] == "a" and a["special"][0] and not a["scored"][0] and a["scored"][1]  # [CLS] is position 0
    assert "".join(t for t, s in zip(a["tokens"], a["special"]) if not s).strip().startswith("I am so grateful")
    for conv in (a, b):
        n = len(conv["tokens"])
        assert all(len(conv["z"][c]) == n == len(conv["raw"][c]) for c in concepts)
        for c in concepts:
            s = conv["summary"][c]
            fired = [i for i, (r, ok) in enumerate(zip(conv["raw"][c], conv["scored"])) if ok and r >= 0.1]
            assert s["n_fired"] == len(fired) and s["first"] == (fired[0] if fired else None)
            assert conv["z"][c][3] == pytest.approx(conv["raw"][c][3] / 0.05, abs=1e-2)
    page = (out / "trace.html").read_text()
    assert page.count('<section class="conv">') == 2
    assert "&lt;" in page and "<b>" not in page  # token text is escaped
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")  # self-contained
    assert "fired" in capsys.readouterr().out


def test_trace_stays_legible_with_200_concepts(tmp_path):
    m, concepts = _pair(tmp_path, n_concepts=200)
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--text", "The rain was soft and the tea was hot.",
                 "--output-dir", str(out), "--device", "cpu", "--top-k", "4", "--layer", "3"]) == 0
    page = (out / "trace.html").read_text()
    assert len(re.findall(r"<option ", page)) == 4 and page.count("<svg") == 4
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["conversations"][0]["z"]) == 200 and trace["layer"] == 3


def test_trace_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    m, _ = _pair(tmp_path)
    base = ["trace", "--manifest", str(m), "--output-dir", str(tmp_path / "t"), "--device", "cpu"]
    assert main(base + ["--text", "hi", "--concepts", "nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(base + ["--text", "hi", "--layer", "9"]) == 2
    assert "--layer 9" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    assert main(base + ["--input", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "t" / "trace.html").exists()


def test_format_1_manifest_traces_against_the_text_calibration(tmp_path):
    m, _ = _pair(tmp_path, token=False)
    man = json.loads(m.read_text())
    man["format_version"] = 1
    m.write_text(json.dumps(man))
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--text", "hello there",
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "trace.json").read_text())["calibration"] == "text"


def test_moving_average():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert moving_average(np.zeros(0)).size == 0


def test_a_calibration_without_spread_gives_no_z_threshold_and_valid_json():
    """A token calibration from one negative has neg_std 0: its z threshold is undefined (None), not NaN
    (which the trace's JSON, written with allow_nan=False, and the page's JSON.parse both reject)."""
    cal = {"neg_mean": 1.0, "neg_std": 0.0, "threshold": 1.5}
    manifest = {"concepts": ["calm"], "per_concept": {"calm": {"layers": {"3": {"token_calibration": cal}}}}}
    kind, thr = thresholds(manifest, 3)
    assert kind == "token" and thr["calm"]["z"] is None and thr["calm"]["raw"] == 1.5
    json.dumps(thr, allow_nan=False)


BIDI = "\u202e\u2066"  # RIGHT-TO-LEFT OVERRIDE, LEFT-TO-RIGHT ISOLATE


def test_bidi_controls_in_a_text_are_shown_as_markers_and_kept_in_the_json(tmp_path):
    """Reproduction: a U+202E in a token piece went raw into trace.html and reversed the tokens after it."""
    m, _ = _pair(tmp_path)
    out = tmp_path / "trace"
    text = "pay the invoice to \u202eevil corp\u202c now, \u2066said\u2069 nobody"
    assert main(["trace", "--manifest", str(m), "--text", text, "--output-dir", str(out), "--device", "cpu"]) == 0
    conv = json.loads((out / "trace.json").read_text(encoding="utf-8"))["conversations"][0]
    pieces = [t for t, s in zip(conv["tokens"], conv["special"]) if not s]
    assert "".join(pieces) == text  # the JSON keeps the true text, controls included
    page = (out / "trace.html").read_text(encoding="utf-8")
    assert not any(ch in page for ch in BIDI_CONTROLS)
    assert 'title="U+202E RIGHT-TO-LEFT OVERRIDE">⟨U+202E⟩</span>' in page
    # Each token span reads as its piece, with a marker where a control was.
    body = page[page.index('<div class="tokens"'):]
    body = body[: body.index("</div>")]
    shown = re.findall(r'<span data-i="(\d+)" class="[^"]*" title="[^"]*">'
                       r'((?:[^<]|<span class="bidi"[^>]*>[^<]*</span>)*)</span>', body)
    assert len(shown) == len(conv["tokens"])
    for i, content in shown:
        expected = conv["tokens"][int(i)]
        for ch in BIDI_CONTROLS:
            expected = expected.replace(ch, bidi_marker(ch))
        assert html.unescape(re.sub(r"<[^>]+>", "", content)) == expected
    assert any(BIDI[0] in t for t in conv["tokens"]) and any(BIDI[1] in t for t in conv["tokens"])


def _long_text(n_chars: int = 200_000) -> str:
    words = "the build failed again and I am so grateful for the help yesterday thank you".split()
    rng = np.random.default_rng(1)
    return " ".join(words[i] for i in rng.integers(0, len(words), n_chars // 3))[:n_chars]


def test_a_trace_says_when_max_tokens_cut_an_input(tmp_path, capsys):
    """Reproduction: a 200 kB text showed its first tokens (max_tokens 128 here) and nothing said so."""
    from amygdala_dagster.engine.models import load_model

    m, _ = _pair(tmp_path)
    text = _long_text()
    inp = tmp_path / "long.jsonl"
    inp.write_text(json.dumps({"id": "long", "text": text}) + "\n"
                   + json.dumps({"id": "short", "text": "The rain was soft."}) + "\n")
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--input", str(inp), "--output-dir", str(out), "--device", "cpu"]) == 0
    total = len(load_model("minilm", device="cpu").tokenizer(text, verbose=False)["input_ids"])
    assert total > 30_000
    long, short = json.loads((out / "trace.json").read_text())["conversations"]
    assert long["truncated"] == {"tokens_total": total, "tokens_kept": 128} and len(long["tokens"]) == 128
    assert short["truncated"] is None
    page = html.unescape((out / "trace.html").read_text())
    assert page.count("Cut to the readout's max_tokens") == 1
    assert f"128 of the input's {total} tokens are shown" in page
    assert page.index("Cut to the readout") < page.index("<h2>short</h2>")  # in the long input's section
    captured = capsys.readouterr()
    assert f"long: 128 of {total} tokens (cut)" in captured.out
    assert re.search(r"^short: \d+ tokens; fired", captured.out, re.M)
    assert "1 of 2 input(s) cut to the readout's max_tokens (128 tokens)" in captured.err
    assert f"longest: {total} tokens" in captured.err


@pytest.mark.parametrize("max_tokens", [8, 16, 400])
def test_encode_counts_the_whole_input_and_cuts_as_the_tokenizer_truncates(tmp_path, max_tokens):
    from amygdala_dagster.engine.inputs import encode
    from amygdala_dagster_tests.tiny_models import build_tokenizer

    tok = build_tokenizer(tmp_path)  # prepends <s>: one special token per chunk of the cut
    for item in (_long_text(2_000), [{"role": "user", "content": _long_text(1_000)}]):
        enc = encode(tok, item, max_tokens)
        text = item if isinstance(item, str) else f"user: {item[0]['content']}"
        whole = tok(text, verbose=False)["input_ids"]
        assert enc.n_tokens_total == len(whole) and enc.truncated == (len(whole) > max_tokens)
        assert enc.ids == tok(text, truncation=True, max_length=max_tokens, verbose=False)["input_ids"]


def test_trace_gives_the_episode_rule_per_conversation_and_concept(tmp_path, capsys):
    from amygdala_dagster.readout.episode import statistic

    m, concepts = _pair(tmp_path)
    manifest = json.loads(m.read_text())
    for i, c in enumerate(concepts):  # c000 always fires, c001 never, c002 at a threshold of 0
        for layer in LAYERS:
            manifest["per_concept"][c]["layers"][str(layer)]["episode"] = {
                "statistic": "ewm", "half_life_tokens": 8.0, "min_tokens": 4, "skip_first_tokens": 1,
                "false_alarm_rate": 0.05, "threshold": [-100.0, 100.0, 0.0][i],
                "threshold_z": [-2000.0, 2000.0, 0.0][i]}
    m.write_text(json.dumps(manifest))
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--input", str(_inputs(tmp_path)), "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace["episode_rules"]["c001"]["threshold"] == 100.0
    for conv in trace["conversations"]:
        scored = np.array(conv["scored"])
        for c in concepts:
            ep = conv["episode"][c]
            assert set(ep) >= {"score", "fired", "first"}
            raw = np.array(conv["raw"][c], dtype=float)[scored]
            stat = statistic(raw, 8.0)
            assert ep["score"] == pytest.approx(stat[-1], abs=1e-3)  # the statistic at the end of the text
            thr = trace["episode_rules"][c]["threshold"]
            deciding = stat[3:] >= thr
            assert ep["fired"] == bool(deciding.any())
            if ep["fired"]:
                assert ep["first"] == int(np.flatnonzero(scored)[3 + int(np.argmax(deciding))])
            assert len(conv["episode_z"][c]) == len(conv["tokens"])
        assert conv["episode"]["c000"]["fired"] and conv["episode"]["c000"]["first"] == int(np.flatnonzero(scored)[3])
        assert not conv["episode"]["c001"]["fired"]
        assert conv["episode_fired"] == [c for c in concepts if conv["episode"][c]["fired"]]
        fired = conv["episode_fired"]
        assert set(conv["top"][:len(fired)]) == set(fired)  # the concepts whose rule fired come first
    page = (out / "trace.html").read_text()
    assert "episode rule fired for" in page and "first fired at token" in page and "episode statistic" in page
    assert "episode rule fired: c000" in capsys.readouterr().out


def test_a_format_2_manifest_traces_without_an_episode_rule(tmp_path):
    m, concepts = _pair(tmp_path)
    out = tmp_path / "trace"
    assert main(["trace", "--manifest", str(m), "--text", "The rain stopped at last.", "--output-dir", str(out),
                 "--device", "cpu"]) == 0
    trace = json.loads((out / "trace.json").read_text())
    conv = trace["conversations"][0]
    assert conv["episode"] == {c: None for c in concepts} and conv["episode_z"] is None
    assert trace["episode_rules"] == {c: None for c in concepts}
    assert "episode rule" not in (out / "trace.html").read_text()
