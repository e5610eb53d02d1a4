"""The AMYGDALA_* environment, read in one place (amygdala_dagster.workflow.settings): every command honours every
variable of the README's Configuration table where no flag is given, and a value out of bounds is one line
naming the variable (exit 2), never a validation traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from amygdala_dagster.commands import backfill_emotion as backfill_cmd
from amygdala_dagster.commands import run as run_cmd
from amygdala_dagster.commands.cli import main as cli_main
from amygdala_dagster.workflow.settings import MAX_SHARDS, ConfigurationError, Settings, current_settings
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph
from amygdala_dagster_tests.test_manifest import FIELDS, make_readout

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {  # each command with the arguments it needs to get past argparse
    "run": ["run"], "backfill-emotion": ["backfill-emotion", "joy"], "report": ["report"], "inspect": ["inspect"],
    "trace": ["trace", "--text", "hello", "--output-dir", "trace_out"], "serve-graph": ["serve-graph"],
}
# one value out of bounds per variable of the Configuration table, and the line it must give
BAD = {
    "AMYGDALA_SHARDS": ("abc", "must be a whole number from 1 to 64, got 'abc'"),
    "AMYGDALA_MODEL": (" ", None),  # blank is "unset" (env_ignore_empty), see test_blank_variables_are_unset
    "AMYGDALA_DEVICE": ("gpu0", "must be auto, cpu, mps, cuda or cuda:N, got 'gpu0'"),
    "AMYGDALA_DTYPE": ("int8", "must be one of auto, bf16"),
    "AMYGDALA_TARGET_LAYERS": ("3;18", "must be comma-separated layer indices"),
    "AMYGDALA_DEVICE_MAP": ("everywhere", "must be \"auto\""),
    "AMYGDALA_KEEP_RELEASES": ("0", "must be a whole number from 1 to 1000, got '0'"),
    "AMYGDALA_EMOTIONS": ("joy,9lives", "must be comma-separated emotion names"),
    "AMYGDALA_FRESHNESS_HOURS": ("-1", "must be a number of hours above 0"),
    "AMYGDALA_SENSOR_INTERVAL_S": ("often", "must be a whole number of seconds from 1 to 86400, got 'often'"),
}
BAD = {k: v for k, v in BAD.items() if v[1] is not None}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No AMYGDALA_* from the outside; a throw-away DAGSTER_HOME; the working directory a temp dir."""
    for key in list(os.environ):
        if key.startswith("AMYGDALA_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- bounds: one line, exit 2
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variable", BAD)
def test_a_variable_out_of_bounds_is_one_line_naming_it_for_every_command(variable, command, monkeypatch, capsys):
    value, message = BAD[variable]
    monkeypatch.setenv(variable, value)
    assert cli_main(COMMANDS[command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"amygdala {command}: {variable} {message}"] or (
        len(err) == 1 and err[0].startswith(f"amygdala {command}: {variable} {message}")), err


@pytest.mark.parametrize("value", ["abc", "0", "1000", "-3", "2.5"])
def test_shards_out_of_bounds_from_the_environment_is_one_line_not_a_pydantic_traceback(value, monkeypatch):
    monkeypatch.setenv("AMYGDALA_SHARDS", value)
    proc = subprocess.run([sys.executable, "-m", "amygdala_dagster.commands.cli", "run"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip() == \
        f"amygdala run: AMYGDALA_SHARDS must be a whole number from 1 to {MAX_SHARDS}, got {value!r}"


@pytest.mark.parametrize("command", ["run", "backfill-emotion"])
@pytest.mark.parametrize("flag, value", [("--shards", "1000"), ("--shards", "0"), ("--shards", "x"),
                                         ("--device", "gpu0"), ("--target-layers", "a,b"),
                                         ("--device-map", "everywhere"), ("--episode-false-alarm-rate", "0"),
                                         ("--episode-false-alarm-rate", "1.5")])
def test_a_flag_out_of_bounds_is_refused_by_argparse_with_exit_2(command, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main([*COMMANDS[command], flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"amygdala {command}: error: argument {flag}") and f"got {value!r}" in err


def test_both_memory_sources_at_once_are_refused(monkeypatch):
    monkeypatch.setenv("AMYGDALA_MEMORY_MCP_URL", "http://127.0.0.1:7777")
    monkeypatch.setenv("AMYGDALA_MEMORY_FILE", "/g.jsonl")
    with pytest.raises(ConfigurationError, match="set one of AMYGDALA_MEMORY_MCP_URL and AMYGDALA_MEMORY_FILE"):
        current_settings()


def test_blank_variables_are_unset_and_defaults_are_the_documented_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("AMYGDALA_MODEL", "")
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", "")
    s = current_settings()
    assert (s.model, s.device, s.dtype, s.shards, s.keep_releases, s.freshness_hours, s.sensor_interval_s) == \
        ("minilm", "auto", "auto", 1, 5, 24.0, 60)
    assert s.output_location() == str(tmp_path / "amygdala_output")
    assert s.cache_location() == Path.home() / ".cache" / "amygdala" / "activations"
    assert s.emotions == [] and s.target_layers is None and s.device_map is None


def test_every_variable_of_the_readme_configuration_table_is_a_setting():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Configuration"):readme.index("### GPU boxes")]
    rows = "\n".join(line.split("|")[1] for line in section.splitlines() if line.startswith("| `AMYGDALA_"))
    documented = {v.removeprefix("AMYGDALA_").lower() for v in re.findall(r"`(AMYGDALA_[A-Z_]+)`", rows)}
    # the token's variable is configurable (--token-env) and is read when the graph is contacted, never stored
    assert documented - {"memory_token"} == set(Settings.model_fields)


# ----------------------------------------------------------------------------- every command honours them
class Launched(Exception):
    """Raised by the stubbed launch: the command got as far as starting a run, with these resources."""

    def __init__(self, resources):
        super().__init__("launched")
        self.resources = resources


def _stub_launch(resources, instance, *args):
    raise Launched(resources)


RUN_VARIABLES = {  # variable -> (value, the resource field it sets, the value the field gets)
    "AMYGDALA_MEMORY_MCP_URL": ("http://127.0.0.1:9/mcp", ("memory", "mcp_url"), "http://127.0.0.1:9/mcp"),
    "AMYGDALA_MEMORY_FILE": ("{tmp}/g.jsonl", ("memory", "file"), "{tmp}/g.jsonl"),
    "AMYGDALA_MODEL": ("/models/custom", ("model", "model"), "/models/custom"),
    "AMYGDALA_DEVICE": ("cuda:1", ("model", "device"), "cuda:1"),
    "AMYGDALA_DTYPE": ("BF16", ("model", "dtype"), "bf16"),
    "AMYGDALA_TARGET_LAYERS": ("3, 18,-1", ("model", "layers"), "3,18,-1"),
    "AMYGDALA_DEVICE_MAP": ("balanced", ("model", "device_map"), "balanced"),
    "AMYGDALA_SHARDS": ("7", ("sharding", "shards"), 7),
    "AMYGDALA_OUTPUT_DIR": ("{tmp}/elsewhere/out", ("storage", "base_path"), "{tmp}/elsewhere/out"),
    "AMYGDALA_CACHE_DIR": ("s3://bucket/cache", ("model", "cache_dir"), "s3://bucket/cache"),
    "AMYGDALA_EMOTIONS": ("Joy, awe", ("selection", "curated"), ["joy", "awe"]),
}


@pytest.mark.parametrize("command", ["run", "backfill-emotion"])
@pytest.mark.parametrize("variable", RUN_VARIABLES)
def test_run_and_backfill_take_every_variable_where_no_flag_is_given(variable, command, monkeypatch, tmp_path):
    value, (resource, field), expected = RUN_VARIABLES[variable]
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    monkeypatch.setattr(run_cmd, "materialize_all", _stub_launch)
    monkeypatch.setattr(backfill_cmd, "backfill_emotions",
                        lambda names, resources, instance: _stub_launch(resources, instance))
    with pytest.raises(Launched) as launched:
        cli_main(COMMANDS[command])
    got = getattr(launched.value.resources[resource], field)
    expected = expected.format(tmp=tmp_path) if isinstance(expected, str) else expected
    if command == "backfill-emotion" and variable == "AMYGDALA_EMOTIONS":
        expected = [*expected, "joy"][:2]  # the backfilled name joins the curated ones (already there)
    assert got == expected


def test_flags_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(tmp_path / "env-out"))
    monkeypatch.setenv("AMYGDALA_SHARDS", "4")
    monkeypatch.setenv("AMYGDALA_MEMORY_MCP_URL", "http://127.0.0.1:9/mcp")
    monkeypatch.setattr(run_cmd, "materialize_all", _stub_launch)
    with pytest.raises(Launched) as launched:
        cli_main(["run", "--output-dir", "flag-out", "--shards", "2", "--memory-file", "g.jsonl"])
    res = launched.value.resources
    assert res["storage"].base_path == str(tmp_path / "flag-out") and res["sharding"].shards == 2
    assert res["memory"].file == "g.jsonl" and res["memory"].mcp_url is None


def test_the_episode_false_alarm_rate_goes_through_the_evaluation_resource(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_cmd, "materialize_all", _stub_launch)
    with pytest.raises(Launched) as launched:
        cli_main(["run", "--episode-false-alarm-rate", "0.1"])
    evaluation = launched.value.resources["evaluation"]
    assert evaluation.episode_settings() == {"false_alarm_rate": 0.1, "half_life_tokens": 128.0, "min_tokens": 32}
    with pytest.raises(Launched) as launched:
        cli_main(["run"])
    assert launched.value.resources["evaluation"].episode_false_alarm_rate == 0.05


@pytest.mark.parametrize("command", ["run", "backfill-emotion"])
def test_an_unwritable_output_dir_from_the_environment_is_named_as_the_variable(command, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(blocker / "out"))
    assert cli_main(COMMANDS[command]) == 2
    assert capsys.readouterr().err.startswith(f"amygdala {command}: cannot write AMYGDALA_OUTPUT_DIR {blocker / 'out'}")


def _published_pair(directory: Path) -> str:
    from amygdala_dagster.readout.manifest import write_readout

    directory.mkdir(parents=True)
    write_readout(directory / "vectors.safetensors", directory / "manifest.json", make_readout(), **FIELDS)
    return json.loads((directory / "manifest.json").read_text())["vectors_sha256"]


def test_inspect_reads_the_output_dir_of_the_environment(monkeypatch, tmp_path, capsys):
    sha = _published_pair(tmp_path / "env-out")
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(tmp_path / "env-out"))
    assert cli_main(["inspect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == sha


@pytest.mark.parametrize("command", ["report", "trace"])
def test_report_and_trace_read_the_output_dir_of_the_environment(command, monkeypatch, tmp_path, capsys):
    (tmp_path / "env-out").mkdir()
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(tmp_path / "env-out"))
    assert cli_main(COMMANDS[command]) != 0
    assert str(tmp_path / "env-out") in capsys.readouterr().err  # it looked there, not in ./amygdala_output


def test_report_takes_the_device_of_the_environment(monkeypatch, tmp_path):
    from amygdala_dagster.commands import report

    monkeypatch.setenv("AMYGDALA_DEVICE", "cuda:3")
    seen = {}

    def stop(args):
        seen.update(device=args.device, output_dir=str(args.output_dir))
        raise Launched(None)

    monkeypatch.setattr(report, "build_report", stop)
    with pytest.raises(Launched):
        cli_main(["report"])
    assert seen == {"device": "cuda:3", "output_dir": str(tmp_path / "amygdala_output")}


def test_trace_applies_the_environment_device(monkeypatch, tmp_path):
    import argparse

    from amygdala_dagster.commands import trace

    monkeypatch.setenv("AMYGDALA_DEVICE", "cuda:3")
    parser = argparse.ArgumentParser()
    trace.configure(parser)
    args = parser.parse_args(["--text", "x", "--output-dir", "o"])
    monkeypatch.setattr(trace, "load_readout", lambda *a, **k: (_ for _ in ()).throw(Launched(None)))
    (tmp_path / "amygdala_output").mkdir()
    with pytest.raises(Launched):
        trace.run_trace(args)
    assert args.device == "cuda:3" and args.manifest == str(tmp_path / "amygdala_output")


def test_serve_graph_serves_the_memory_file_of_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AMYGDALA_MEMORY_FILE", str(tmp_path / "missing.jsonl"))
    assert cli_main(["serve-graph"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"amygdala serve-graph: AMYGDALA_MEMORY_FILE {tmp_path / 'missing.jsonl'} does not exist"


def test_keep_releases_and_cache_dir_come_from_the_settings(monkeypatch, tmp_path):
    from amygdala_dagster.workflow.engine_settings import EngineSettings

    monkeypatch.setenv("AMYGDALA_KEEP_RELEASES", "2")
    monkeypatch.setenv("AMYGDALA_CACHE_DIR", "s3://bucket/cache")
    assert current_settings().keep_releases == 2 and EngineSettings().cache_root() == "s3://bucket/cache"
    monkeypatch.setenv("AMYGDALA_CACHE_DIR", "~/c")
    assert EngineSettings().cache_root() == Path.home() / "c"
    assert EngineSettings(cache_dir="/elsewhere").cache_root() == Path("/elsewhere")


def test_the_resources_defaults_read_the_settings(monkeypatch, tmp_path):
    from amygdala_dagster.pipeline import resources as R

    monkeypatch.setenv("AMYGDALA_MODEL", "/m")
    monkeypatch.setenv("AMYGDALA_SHARDS", "3")
    monkeypatch.setenv("AMYGDALA_EMOTIONS", "awe")
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", "s3://b/out")
    model = R.ModelResource()
    assert (model.model, R.ShardingResource().shards) == ("/m", 3)
    assert R.SelectionResource().curated == ["awe"] and R.ArtifactStorage().base_path == "s3://b/out"
    with pytest.raises(Exception, match="less than or equal to 64"):
        R.ShardingResource(shards=65)


def test_the_code_location_takes_the_sensor_interval_and_freshness_window(tmp_path):
    code = ("import amygdala_dagster.pipeline.definitions as d; "
            "s = d.defs.resolve_sensor_def('memory_graph_sensor'); "
            "a = d.defs.resolve_assets_def('readout_manifest'); "
            "print(s.minimum_interval_seconds, a.specs_by_key[a.key].freshness_policy.fail_window.to_timedelta())")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMYGDALA_")}, "PYTHONPATH": str(REPO),
           "AMYGDALA_SENSOR_INTERVAL_S": "7", "AMYGDALA_FRESHNESS_HOURS": "6"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[0] == "7" and "6:00:00" in proc.stdout
    env["AMYGDALA_SENSOR_INTERVAL_S"] = "0"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode != 0
    assert "AMYGDALA_SENSOR_INTERVAL_S must be a whole number of seconds from 1 to 86400, got '0'" in proc.stderr


def test_shards_are_lowered_to_the_runs_unique_texts_and_it_is_logged(monkeypatch, tmp_path, caplog):
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.graph.sources import JsonlSource
    from amygdala_dagster.pipeline.definitions import default_resources
    from amygdala_dagster.pipeline.runner import clamp_shards

    graph = write_graph(tmp_path / "g.jsonl", small_graph(2))
    monkeypatch.setenv("AMYGDALA_SHARDS", str(MAX_SHARDS))
    resources = default_resources()
    nodes, _ = JsonlSource(str(graph)).fetch_nodes()
    snapshot = build_snapshot(nodes)
    with caplog.at_level(logging.WARNING, logger="amygdala_dagster.pipeline.runner"):
        clamped = clamp_shards(resources, snapshot, ["warmth"])
    n = clamped["sharding"].shards
    assert 1 <= n < MAX_SHARDS and resources["sharding"].shards == MAX_SHARDS
    assert f"{MAX_SHARDS} shards asked for, but the run has {n} unique text(s)" in caplog.text
    monkeypatch.setenv("AMYGDALA_SHARDS", "1")
    assert clamp_shards(default_resources(), snapshot, ["warmth"])["sharding"].shards == 1


# ----------------------------------------------------------------------------- end to end, real processes
def amygdala(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AMYGDALA_")}
    return subprocess.run([sys.executable, "-m", "amygdala_dagster.commands.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd,
                          env={**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_run_backfill_and_inspect_honour_the_environment_end_to_end(tmp_path):
    """`amygdala run` then `amygdala backfill-emotion` with only AMYGDALA_* set: the pair lands in
    $AMYGDALA_OUTPUT_DIR (never ./amygdala_output), the cache in $AMYGDALA_CACHE_DIR, the layers and the
    releases kept are the environment's, and `amygdala inspect` with no argument checks that pair."""
    graph = write_graph(tmp_path / "graph.jsonl", small_graph(6, wonder_on_curiosity=True))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {"AMYGDALA_MEMORY_FILE": str(graph), "AMYGDALA_OUTPUT_DIR": str(tmp_path / "env-out"),
           "AMYGDALA_CACHE_DIR": str(tmp_path / "env-cache"), "AMYGDALA_TARGET_LAYERS": "2,4",
           "AMYGDALA_KEEP_RELEASES": "1", "AMYGDALA_DEVICE": "cpu", "AMYGDALA_EMOTIONS": "warmth",
           "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    first = amygdala("run", "--min-positives", "3", "--eval-conversations", "none", env=env, cwd=workdir)
    assert first.returncode == 0, first.stderr[-4000:]
    second = amygdala("backfill-emotion", "wonder", "--min-positives", "3", "--eval-conversations", "none",
                      env=env, cwd=workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "activations: 0 texts forwarded" in second.stdout  # wonder's texts are curiosity's: all cached
    assert not (workdir / "amygdala_output").exists()
    manifest = json.loads((tmp_path / "env-out" / "manifest.json").read_text())
    assert manifest["layers"] == [2, 4] and "wonder" in manifest["concepts"]
    assert len(list((tmp_path / "env-out" / "releases").iterdir())) == 1
    assert any((tmp_path / "env-cache").rglob("*.safetensors"))
    inspect = amygdala("inspect", env=env, cwd=workdir)
    assert inspect.returncode == 0 and manifest["vectors_sha256"] in inspect.stdout, inspect.stdout + inspect.stderr
