"""`amygdala run` / `backfill-emotion` / `report`: input files refused before any work, and a failed run's
message about the published pair matching what is on disk (Reliability round 2, items 1 and 3)."""

from __future__ import annotations

import json
import os
import shutil
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


def _run(tmp_path: Path, out: Path, *extra: str) -> int:
    graph = tmp_path / "graph.jsonl"
    if not graph.exists():
        write_graph(graph, small_graph(8))
    return cli_main(["run", "--memory-file", str(graph), "--output-dir", str(out), "--cache-dir",
                     str(tmp_path / "cache"), "--min-positives", "3", "--eval-conversations", "none", *extra])


def failure_lines(capsys) -> list[str]:
    """The command's own failure message: from its first line on, without warnings logged before it."""
    lines = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("amygdala run:"))
    return [line for line in lines[first:] if line.startswith(("amygdala run:", "  "))]


def _release(out: Path) -> tuple[str, str]:
    """The release ``current`` points at, and its manifest's ``created_at``."""
    release = Path(os.readlink(out / "current")).name
    return release, json.loads((out / "releases" / release / "manifest.json").read_text())["created_at"]


@pytest.mark.slow
def test_a_failed_run_says_what_is_published_as_the_disk_has_it(tmp_path, monkeypatch, capsys):
    """A run that failed after publishing said the pair was 'NOT updated' while `current` had moved. The message
    now compares the release `current` points at before and after the run."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    out = tmp_path / "out"
    assert _run(tmp_path, out) == 0
    first, first_at = _release(out)
    vectors, manifest = out / "vectors.safetensors", out / "manifest.json"
    capsys.readouterr()

    # 1. the evaluation report cannot be written (a file where its directory goes): fails after publication
    shutil.rmtree(out / "report")
    (out / "report").write_text("in the way")
    assert _run(tmp_path, out) == 1
    err = failure_lines(capsys)
    second, second_at = _release(out)
    assert second != first  # `current` moved: the message must say so
    assert err[0].startswith("amygdala run: the run failed: evaluation_report:")
    assert f"  {vectors} and {manifest} WERE updated before the failure: they are the new pair from {second_at} " \
           f"(release {second}), which replaced the pair from {first_at} (release {first})" in err
    assert "  the run failed after publishing them: what the failed steps (above) write is not up to date" in err
    assert not any("NOT updated" in line for line in err)
    (out / "report").unlink()

    # 2. the staged vectors cannot be written: fails before publication, `current` stays
    shutil.rmtree(out / "readout")
    (out / "readout").write_text("in the way")
    assert _run(tmp_path, out) == 1
    err = failure_lines(capsys)
    assert _release(out) == (second, second_at)
    assert err[0].startswith("amygdala run: the run failed: readout_vectors:")
    assert f"  {vectors} and {manifest} were NOT updated: they are still the pair from {second_at} " \
           f"(release {second})" in err
    assert not any("WERE updated" in line for line in err)

    # 3. the same failure in a directory where nothing was ever published
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "readout").write_text("in the way")
    assert _run(tmp_path, fresh) == 1
    assert "  no vectors or manifest were published" in failure_lines(capsys)
    assert not (fresh / "current").exists()


def test_the_pair_message_follows_the_release_current_points_at(tmp_path):
    """The comparison behind a failed run's message, on real publications (the slow test above runs it end to end)."""
    from amygdala_dagster.commands.run import pair_lines, published_pair
    from amygdala_dagster.files.storage import Store

    out = tmp_path / "out"
    out.mkdir()
    store = Store(str(out))
    assert published_pair(store) is None
    assert pair_lines(store, None, published_pair(store)) == ["no vectors or manifest were published"]
    # the layout before releases: two plain files
    (out / "manifest.json").write_text(json.dumps({"created_at": CREATED_AT}))
    (out / "vectors.safetensors").write_bytes(b"v0")
    plain = published_pair(store)
    assert plain.release is None and plain.describe() == f"from {CREATED_AT}"
    names = f"{out / 'vectors.safetensors'} and {out / 'manifest.json'}"
    publish_pair(out / "vectors.safetensors", out / "manifest.json", b"v1",
                 json.dumps({"created_at": "2026-01-01T00:00:00Z"}).encode())
    first = published_pair(store)
    assert first.release == Path(os.readlink(out / "current")).name and first.created_at == "2026-01-01T00:00:00Z"
    assert pair_lines(store, plain, first)[0] == (
        f"{names} WERE updated before the failure: they are the new pair from 2026-01-01T00:00:00Z "
        f"(release {first.release}), which replaced the pair from {CREATED_AT}")
    assert pair_lines(store, first, published_pair(store)) == [
        f"{names} were NOT updated: they are still the pair from 2026-01-01T00:00:00Z (release {first.release})"]
    # the same content published again is a new release: `current` moved, and the message says so
    publish_pair(out / "vectors.safetensors", out / "manifest.json", b"v1",
                 json.dumps({"created_at": "2026-01-01T00:00:00Z"}).encode())
    again = published_pair(store)
    assert again.release != first.release and "WERE updated" in pair_lines(store, first, again)[0]
