"""`amygdala run` / `backfill-emotion` / `report`: input files refused before any work (Reliability round 2,
item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amygdala_dagster.commands.cli import main as cli_main
from amygdala_dagster.readout.publish import publish_pair
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph

CREATED_AT = "2020-01-01T00:00:00Z"

# (file content, the message after "<path>") -- each read by readout.runtime.read_inputs
CALIBRATION_CASES = {
    "empty-text": ('{"text": "fine"}\n{"text": "   "}\n', ":2: empty text"),
    "messages-not-a-list": ('{"messages": "hello"}\n',
                            ':1: "messages" must be a non-empty list of {"role", "content"} objects'),
    "bad-json": ('{"text": "a"}\n\n{"text": \n', ":3: not valid JSON (Expecting value at column 10)"),
    "empty-file": ("", ": no records"),
    "blank-file": ("\n   \n\n", ": no records"),
}
CONVERSATION_CASES = {
    "no-emotions": ('{"text": "a", "emotions": ["joy"]}\n{"text": "b"}\n',
                    ':2: expected "emotions": a list of emotion names'),
    "emotions-not-a-list": ('{"text": "a", "emotions": "joy"}\n', ':1: expected "emotions": a list of emotion names'),
    "empty-file": ("", ": no records"),
    "blank-file": ("  \n", ": no records"),
    "bad-json": ("[1, 2\n", ":1: not valid JSON (Expecting ',' delimiter at column 6)"),
}


def published_output(tmp_path: Path) -> Path:
    """An output directory holding a published pair (one release, ``current`` pointing at it)."""
    out = tmp_path / "out"
    out.mkdir()
    manifest = json.dumps({"format_version": 2, "created_at": CREATED_AT}).encode()
    publish_pair(out / "vectors.safetensors", out / "manifest.json", b"not read by a refused command", manifest)
    return out


def listing(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.lstat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if not line.startswith("20")]  # not log lines


CASES = ([("--calibration-texts", name, *case) for name, case in CALIBRATION_CASES.items()]
         + [("--eval-conversations", name, *case) for name, case in CONVERSATION_CASES.items()])


@pytest.mark.parametrize("command", ["run", "backfill-emotion"])
@pytest.mark.parametrize(("flag", "name", "content", "message"), CASES, ids=[f"{c[0][2:]}-{c[1]}" for c in CASES])
def test_a_bad_input_file_is_refused_before_any_work_in_one_line(tmp_path, monkeypatch, capsys, command, flag, name,
                                                                  content, message):
    """A bad --calibration-texts / --eval-conversations file was found inside the run after 13-17 s of work
    (exit 1; --eval-conversations after the publication, which moved `current`). Now: exit 2 before anything is
    read or written, one line naming the flag, the file and the line."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    out = published_output(tmp_path)
    before, current = listing(out), os.readlink(out / "current")
    bad = tmp_path / f"{name}.jsonl"
    bad.write_text(content, encoding="utf-8")
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(8))
    names = ["warmth"] if command == "backfill-emotion" else []
    rc = cli_main([command, *names, "--memory-file", str(graph), "--output-dir", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--min-positives", "3", flag, str(bad)])
    assert rc == 2
    assert stderr_lines(capsys) == [f"amygdala {command}: {flag} {bad}{message}"]
    assert os.readlink(out / "current") == current and listing(out) == before  # nothing published or written
    assert not (tmp_path / "cache").exists() and not (tmp_path / "dagster_home").exists()


@pytest.mark.parametrize(("name", "content", "message"), [(n, *c) for n, c in CONVERSATION_CASES.items()],
                         ids=list(CONVERSATION_CASES))
def test_report_refuses_a_bad_eval_conversations_file_before_reading_anything(tmp_path, capsys, name, content,
                                                                              message):
    out = published_output(tmp_path)
    before = listing(out)
    bad = tmp_path / f"{name}.jsonl"
    bad.write_text(content, encoding="utf-8")
    assert cli_main(["report", "--output-dir", str(out), "--eval-conversations", str(bad)]) == 2
    assert stderr_lines(capsys) == [f"amygdala report: --eval-conversations {bad}{message}"]
    assert listing(out) == before and not (out / "report").exists()


def test_missing_and_unreadable_input_files_name_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    out = published_output(tmp_path)
    assert cli_main(["run", "--output-dir", str(out), "--eval-conversations", str(tmp_path / "nope.jsonl")]) == 2
    assert stderr_lines(capsys) == [f"amygdala run: --eval-conversations {tmp_path / 'nope.jsonl'}: no such file"]
    # "none" skips the runtime section of the report; for --calibration-texts it is a file name like any other
    assert cli_main(["run", "--output-dir", str(out), "--calibration-texts", "none"]) == 2
    assert stderr_lines(capsys) == ["amygdala run: --calibration-texts none: no such file"]
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}], "emotions": []}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"text": "x", "id": "1"}\n')
    assert cli_main(["run", "--output-dir", str(out), "--eval-conversations", str(good),
                     "--calibration-texts", str(bad)]) == 2
    assert stderr_lines(capsys) == [f"amygdala run: --calibration-texts {bad}:2: duplicate id '1'"]

