"""``python -m amygdala_dagster.extract_training_pairs`` end to end (Contract 2 + the seed's flags)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from amygdala_dagster.commands import extract_training_pairs
from amygdala_dagster.examples.selection import split_for_key
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.snapshot import build_snapshot, snapshot_hash
from amygdala_dagster.graph.tags import is_tag_line

# A graph small enough that the expected examples can be worked out by hand.
RIVER = "Long walk by the river, the light was soft and golden."
NODES = [
    {"key": "j1", "node_type": "journal", "content": RIVER + "\nwarmth:9 joy:8"},
    {"key": "j2", "node_type": "journal", "content": "Another entry about nothing in particular, just a list.\ncalm:3"},
    {"key": "d1", "node_type": "digest",
     "content": "Digest of the week: work, errands, and a long phone call.\nwarmth:8\n\ncuriosity:2"},
    {"key": "d2", "node_type": "digest", "content": "I felt Warmth when they called, unexpected and kind.\njoy:2"},
    {"key": "p1", "node_type": "pattern", "content": "Short.\nwarmth:10"},
    {"key": "p2", "node_type": "pattern", "content": RIVER + "\n\nwarmth:9"},  # same body as j1
    {"key": "u1", "node_type": "journal", "content": "An untagged entry that is long enough to count as text."},
    {"key": "x1", "node_type": "journal", "content": "Malformed tags only here, this entry is long enough.\njoy:high"},
    {"key": "e1", "node_type": "journal", "content": "Ünïcode entry: a quiet night, stars over the harbour.\njoy:9"},
    {"key": "w1", "node_type": "digest",
     "content": "Windows line endings entry, long enough to be kept.\r\nwarmth:2\r\n"},
]
TEXT = {n["key"]: n["content"].replace("\r\n", "\n").split("\n")[0] for n in NODES}


def write_graph(path: Path, nodes=NODES) -> Path:
    path.write_text("".join(json.dumps(n, ensure_ascii=False) + "\n" for n in nodes), encoding="utf-8")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "amygdala_dagster.extract_training_pairs", *args],
        capture_output=True, text=True, timeout=120,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected(key: str, node_type: str, score: float | None, fraction: float) -> dict:
    return {"key": key, "text": TEXT[key], "node_type": node_type, "score": score,
            "split": split_for_key(key, fraction)}


def test_cli_writes_the_contract_2_directory(tmp_path: Path) -> None:
    graph = write_graph(tmp_path / "graph.jsonl")
    out = tmp_path / "examples"
    r = run_cli("--memory-file", str(graph), "--output-dir", str(out), "--min-positives", "1",
                "--holdout-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "joy", "warmth"]

    f = 0.5
    assert read_jsonl(out / "warmth" / "positive.jsonl") == [
        expected("d1", "digest", 8.0, f), expected("j1", "journal", 9.0, f)]  # p2 duplicates j1, p1 too short
    assert read_jsonl(out / "warmth" / "negative.jsonl") == [
        expected("e1", "journal", None, f), expected("j2", "journal", None, f)]  # d2 says "Warmth", w1 tagged 2
    assert read_jsonl(out / "joy" / "positive.jsonl") == [
        expected("e1", "journal", 9.0, f), expected("j1", "journal", 8.0, f)]
    assert read_jsonl(out / "joy" / "negative.jsonl") == [
        expected("d1", "digest", None, f), expected("j2", "journal", None, f), expected("w1", "digest", None, f)]

    for path in out.rglob("*.jsonl"):
        for ex in read_jsonl(path):
            assert not any(is_tag_line(line) for line in ex["text"].splitlines()), (path, ex)
            assert ex["text"] == ex["text"].strip()

    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["parameters"] == {
        "min_positive_score": 8.0, "max_negative_mentions": 0, "min_content_chars": 40,
        "max_examples_per_emotion": 500, "holdout_fraction": 0.5,
    }
    nodes = [MemoryNode(n["key"], n["node_type"], n["content"]) for n in NODES]
    assert index["snapshot_hash"] == snapshot_hash(build_snapshot(nodes))
    assert index["emotion_order"] == ["warmth", "joy"]  # same positives; warmth has more tags
    joy = index["emotions"]["joy"]
    assert (joy["positives"], joy["negatives"]) == (2, 3)
    assert joy["node_types"] == {"positive": {"journal": 2}, "negative": {"digest": 2, "journal": 1}}
    holdout = sum(split_for_key(k, f) == "holdout" for k in ("d1", "j2", "w1"))
    assert (joy["holdout_negatives"], joy["train_negatives"]) == (holdout, 3 - holdout)
    assert index["source"] == str(graph)

    table = r.stdout
    assert "warmth" in table and "joy" in table and str(out) in table
    assert f"reading {graph}" in r.stderr and "nodes" in r.stderr  # the fetch progress bar
    assert "2 of 4 emotions selected" in table  # calm and curiosity have no positives


def test_cli_curated_emotions_and_empty_sets(tmp_path: Path) -> None:
    graph = write_graph(tmp_path / "graph.jsonl")
    (tmp_path / "emotions.txt").write_text("# curated\ncalm\n\nWonder  # not in the graph\n")
    out = tmp_path / "examples"
    r = run_cli("--memory-file", str(graph), "--output-dir", str(out), "--emotions", f"@{tmp_path / 'emotions.txt'}",
                "--max-emotions", "0")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["emotion_order"] == ["calm", "wonder"]
    assert (out / "wonder" / "positive.jsonl").read_text() == ""
    assert index["emotions"]["wonder"]["problems"] == [
        "emotion 'wonder': no positive examples in the train split (0 positives, 5 negatives)"]
    assert len(read_jsonl(out / "wonder" / "negative.jsonl")) == 6
    assert "no positive examples in the train split" in r.stdout and "cannot be trained" in r.stderr
    assert "wonder" in r.stderr  # the curated-but-absent warning


def test_cli_bad_flags_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = write_graph(tmp_path / "graph.jsonl")
    out = tmp_path / "o"
    base = ["--memory-file", str(graph), "--output-dir", str(out)]
    # the real process, for the flags the seed design names and the source choice
    for args, needles in [
        (base + ["--holdout-fraction", "1"], ["--holdout-fraction", "[0, 1)"]),
        (base + ["--min-positive-score", "-3"], ["--min-positive-score", "from 0 to 10"]),
        (base + ["--memory-mcp-url", "http://127.0.0.1:1"], ["--memory-mcp-url", "not both"]),
        (["--memory-mcp-url", "ftp://host", "--output-dir", str(out)], ["--memory-mcp-url", "http(s)"]),
        (["--memory-file", str(graph)], ["--output-dir"]),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert all(n in r.stderr for n in needles), (needles, r.stderr)
        assert "Traceback" not in r.stderr
    # the same parser in-process, for the rest
    for extra, needle in [
        (["--min-content-chars", "-1"], "--min-content-chars"),
        (["--max-negative-mentions", "x"], "--max-negative-mentions"),
        (["--max-examples-per-emotion", "0"], "--max-examples-per-emotion"),
        (["--min-positives", "-1"], "--min-positives"),
        (["--max-emotions", "1.5"], "--max-emotions"),
        (["--holdout-fraction", "nan"], "--holdout-fraction"),
        (["--emotions", f"@{tmp_path / 'missing.txt'}"], "missing.txt"),
        (["--emotions", "joy,../x"], "invalid emotion name '../x'"),
        (["--emotions", " , "], "no emotion names"),
    ]:
        with pytest.raises(SystemExit) as exc:
            extract_training_pairs.main(base + extra)
        assert exc.value.code == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert not out.exists()


def test_cli_unreadable_source_fails_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    r = run_cli("--memory-file", str(tmp_path / "nope.jsonl"), "--output-dir", str(out), "-q")
    assert r.returncode == 1 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    (tmp_path / "bad.jsonl").write_text('{"key": "a", "content": "x"}\n{broken\n')
    r = run_cli("--memory-file", str(tmp_path / "bad.jsonl"), "--output-dir", str(out), "-q")
    assert r.returncode == 1 and "bad.jsonl:2" in r.stderr
    assert not out.exists()


@pytest.mark.slow  # a whole run
def test_cli_over_mcp_matches_the_file_run(tmp_path: Path, graph_server) -> None:
    graph = write_graph(tmp_path / "graph.jsonl", NODES * 1)
    server = graph_server(file=graph)
    a, b = tmp_path / "from_file", tmp_path / "from_mcp"
    r = run_cli("--memory-file", str(graph), "--output-dir", str(a), "--min-positives", "1", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("--memory-mcp-url", server.url, "--output-dir", str(b), "--min-positives", "1")
    assert r.returncode == 0, r.stderr + server.output()
    assert f"reading {server.url}" in r.stderr  # progress while fetching
    assert "HTTP Request" not in r.stderr  # no per-request log lines under the bar
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "index.json":
            ia, ib = (json.loads((d / rel).read_text()) for d in (a, b))
            assert (ia.pop("source"), ib.pop("source")) == (str(graph), server.url)
            assert ia == ib
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_dotted_capital_i_and_overlong_names_do_not_stop_the_extraction(tmp_path: Path) -> None:
    """Issue 9 #2/#3: twelve nodes tagged 'İlham:9' and a 300-character tag name.

    Before, the catalog rejected the lower-cased 'i̇lham' (a combining dot the
    parser's check had let through) and the long name crashed the directory write.
    """
    nodes = [
        {"key": f"t{i:02d}", "node_type": "journal",
         "content": f"Bugün yeni bir fikir geldi aklıma, numara {i}, ve yazdım.\nİlham:9 " + "y" * 300 + ":9"}
        for i in range(12)
    ] + [{"key": f"n{i}", "node_type": "journal", "content": f"A plain day at the desk, entry {i} of the week.\ncalm:4"}
         for i in range(3)]
    graph = write_graph(tmp_path / "graph.jsonl", nodes)
    out = tmp_path / "examples"
    r = run_cli("--memory-file", str(graph), "--output-dir", str(out), "--min-positives", "10")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert index["emotion_order"] == ["i\u0307lham"]
    assert index["emotions"]["i\u0307lham"]["positives"] == 12
    assert index["snapshot"]["malformed_tag_tokens"] == 12  # the long name, once per node
    assert len(read_jsonl(out / "i\u0307lham" / "positive.jsonl")) == 12
