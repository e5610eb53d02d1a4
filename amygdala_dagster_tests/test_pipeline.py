"""The Dagster layer end to end: the whole asset graph on a small graph with the bundled MiniLM.

One module-scoped run materialises everything (three emotion partitions in one
run); later tests reuse its files, instance and activation cache.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from amygdala_dagster.manifest import load_readout
from amygdala_dagster.pipeline import resources as R
from amygdala_dagster.pipeline.assets import ALL_ASSETS
from amygdala_dagster.pipeline.checks import ALL_CHECKS
from amygdala_dagster.pipeline.runner import backfill_emotions, failures, materialize_all, step_metadata
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph

warnings.filterwarnings("ignore", category=dg.BetaWarning)

EMOTIONS = ["curiosity", "frustration", "warmth"]
BLOCKING = {"snapshot_nonempty_unique_keys", "examples_clean_and_disjoint", "examples_min_positives",
            "stats_finite", "vectors_finite_unit_norm", "manifest_matches_vectors"}


def make_resources(graph: Path, out: str, cache: Path, **selection) -> dict:
    return {
        "memory": R.MemoryGraphResource(file=str(graph)),
        "model": R.ModelResource(model="minilm", device="cpu", cache_dir=str(cache)),
        "storage": R.ArtifactStorage(base_path=out),
        "selection": R.SelectionResource(min_positives=3, **selection),
        "evaluation": R.EvaluationResource(bootstrap=20),
    }


def check_results(result) -> dict[str, bool]:
    return {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    # wonder:9 rides on the curiosity nodes; max_emotions=3 keeps it out of the first run.
    graph = write_graph(tmp / "graph.jsonl", small_graph(8, wonder_on_curiosity=True))
    res = make_resources(graph, str(tmp / "out"), tmp / "cache", max_emotions=3)
    instance = dg.DagsterInstance.ephemeral()
    loads0, releases0 = R.MODEL_LOADS, R.MODEL_RELEASES
    result = materialize_all(res, instance)
    return {"tmp": tmp, "graph": graph, "res": res, "instance": instance, "result": result,
            "loads": R.MODEL_LOADS - loads0, "releases": R.MODEL_RELEASES - releases0}


def test_whole_graph_materialises_in_one_run_with_blocking_checks_passing(full_run):
    result, instance, out = full_run["result"], full_run["instance"], full_run["tmp"] / "out"
    assert result.success, failures(result)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"memory_snapshot", "emotion_catalog", "tagged_examples", "activation_stats",
                            "readout_vectors", "readout_manifest", "evaluation_report"}
    assert sorted(instance.get_dynamic_partitions("emotion")) == EMOTIONS
    # every emotion partition was materialised, in this single run
    for key in ("tagged_examples", "activation_stats"):
        parts = instance.get_materialized_partitions(dg.AssetKey(key))
        assert sorted(parts) == EMOTIONS
    checks = check_results(result)
    assert BLOCKING <= set(checks) and all(checks[c] for c in BLOCKING), checks
    assert {"separation_above_threshold", "better_than_baseline"} <= set(checks)
    # the model was loaded exactly once for the three partitions, and every text was forwarded once
    assert full_run["loads"] == 1
    assert full_run["releases"] == 1  # and released when the run ended
    stats = step_metadata(result, "activation_stats")
    assert stats["texts_forwarded"] == stats["unique_texts"] == 32 and stats["texts_cached"] == 0
    assert stats["device"] == "cpu" and stats["tokens"] > 0
    assert stats["tokens_per_s"] > 0 and stats["peak_memory_bytes"] > 0
    readout = load_readout(out / "vectors.safetensors", out / "manifest.json")
    assert readout.concepts == EMOTIONS and readout.hidden_size == 384
    assert (out / "report" / "evaluation.html").is_file() and (out / "report" / "evaluation.json").is_file()
    # lineage: data versions are content hashes, the graph observation feeds the snapshot
    snap = instance.get_latest_materialization_event(dg.AssetKey("memory_snapshot")).asset_materialization
    assert snap.tags["dagster/data_version"] == snap.metadata["snapshot_sha256"].value
    vec = instance.get_latest_materialization_event(dg.AssetKey("readout_manifest")).asset_materialization
    assert vec.tags["dagster/data_version"] == readout.sha256
    assert "dagster/input_data_version/memory_graph" in snap.tags
    # the manifest carries calibration with a decision threshold for every concept and layer
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["cache_root"] == str(full_run["tmp"] / "cache")
    for concept in EMOTIONS:
        for layer in readout.layers:
            cal = manifest["per_concept"][concept]["layers"][str(layer)]["calibration"]
            assert cal["threshold_method"] == "max_f1" and np.isfinite(cal["threshold"])
    # the bundled conversation snippets were scored (the model forwarded them in this same run)
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    assert evaluation["generalisation"], "no snippet scores in the report"
    # each emotion partition shows its own evaluation
    for e in EMOTIONS:
        records = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("activation_stats"), asset_partitions=[e]), limit=5
        ).records
        assert any("evaluation" in r.asset_observation.metadata for r in records), e


def test_definitions_load_and_carry_policies():
    from amygdala_dagster.pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"memory_graph", "memory_snapshot", "evaluation_report"} <= keys
    for key in keys - {"memory_graph"}:
        assert graph.get(dg.AssetKey(key)).code_version, key
    stats = graph.get(dg.AssetKey("activation_stats"))
    assert stats.pools == {"gpu"}
    assert stats.backfill_policy == dg.BackfillPolicy.single_run()
    assert stats.partitions_def == dg.DynamicPartitionsDefinition(name="emotion")
    for key in ("readout_vectors", "readout_manifest"):
        assert graph.get(dg.AssetKey(key)).freshness_policy is not None
    assert defs.get_sensor_def("memory_graph_sensor")


def test_backfill_of_new_emotion_forwards_nothing_when_texts_are_cached(full_run):
    instance = full_run["instance"]
    # also: the threshold rule of the manifest is configurable (here a fixed false-positive rate)
    res = {**full_run["res"], "evaluation": R.EvaluationResource(bootstrap=0, threshold_method="fixed_fpr",
                                                                 target_fpr=0.1)}
    from amygdala_dagster import models

    loads0, weights0 = R.MODEL_LOADS, models.WEIGHT_LOADS
    result = backfill_emotions(["wonder"], res, instance)
    assert result.success, failures(result)
    assert "wonder" in instance.get_dynamic_partitions("emotion")
    stats = step_metadata(result, "activation_stats")
    assert stats["texts_forwarded"] == 0 and stats["texts_cached"] > 0
    # every text was cached: the fingerprint came from config + tokenizer, no weights were read
    assert R.MODEL_LOADS - loads0 == 0 and models.WEIGHT_LOADS - weights0 == 0
    assert stats["model_weights_loaded"] is False
    out = full_run["tmp"] / "out"
    readout = load_readout(out / "vectors.safetensors", out / "manifest.json")
    assert readout.concepts == EMOTIONS + ["wonder"]
    assert "wonder" in instance.get_materialized_partitions(dg.AssetKey("activation_stats"))
    # the manifest's thresholds follow the configured rule and agree with the report's numbers
    manifest = json.loads((out / "manifest.json").read_text())
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    assert evaluation["settings"]["threshold_method"] == "fixed_fpr"
    for concept in readout.concepts:
        for layer in readout.layers:
            cal = manifest["per_concept"][concept]["layers"][str(layer)]["calibration"]
            assert cal["threshold_method"] == "fixed_fpr" and cal["target_fpr"] == 0.1
            reported = evaluation["emotions"][concept]["layers"][str(layer)]["calibration"]
            assert cal["threshold"] == pytest.approx(reported["threshold"]), (concept, layer)


def test_bad_threshold_method_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="threshold_method 'f1'"):
        R.EvaluationResource(threshold_method="f1").threshold()


@pytest.mark.parametrize("via", ["token_env", "EnvVar"])
def test_memory_token_stays_out_of_run_config_events_and_logs(graph_server, tmp_path, monkeypatch, via):
    token = "s3cret-token-for-pipeline-test"
    server = graph_server(small_graph(4), token_env="AMYGDALA_PIPELINE_TEST_TOKEN", token=token)
    monkeypatch.setenv("AMYGDALA_PIPELINE_TEST_TOKEN", token)
    res = make_resources(tmp_path / "unused.jsonl", str(tmp_path / "out"), tmp_path / "cache")
    if via == "EnvVar":
        # token_env=None: only the EnvVar-resolved token can authenticate
        res["memory"] = R.MemoryGraphResource(mcp_url=server.url, token=dg.EnvVar("AMYGDALA_PIPELINE_TEST_TOKEN"),
                                              token_env=None, retries=0)
    else:
        res["memory"] = R.MemoryGraphResource(mcp_url=server.url, token_env="AMYGDALA_PIPELINE_TEST_TOKEN", retries=0)
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(ALL_ASSETS + ALL_CHECKS, instance=instance, resources=res,
                            selection=["memory_snapshot"], raise_on_error=False)
    assert result.success, failures(result)
    assert step_metadata(result, "memory_snapshot")["dagster/row_count"] == 16
    records = instance.get_records_for_run(result.run_id).records
    text = "\n".join(repr(r.event_log_entry) for r in records)
    text += repr(instance.get_run_by_id(result.run_id))
    assert records and token not in text


def test_empty_graph_fails_the_blocking_snapshot_check_and_stops_downstream(tmp_path):
    graph = write_graph(tmp_path / "empty.jsonl", [])
    res = make_resources(graph, str(tmp_path / "out"), tmp_path / "cache")
    result = dg.materialize(ALL_ASSETS + ALL_CHECKS, instance=dg.DagsterInstance.ephemeral(), resources=res,
                            selection=["memory_snapshot", "emotion_catalog"], raise_on_error=False)
    assert check_results(result)["snapshot_nonempty_unique_keys"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"memory_snapshot"}  # emotion_catalog never ran


def test_artifacts_go_to_an_fsspec_url(tmp_path):
    import fsspec

    graph = write_graph(tmp_path / "g.jsonl", small_graph(4))
    res = make_resources(graph, "memory://amygdala-test/out", tmp_path / "cache")
    result = dg.materialize(ALL_ASSETS + ALL_CHECKS, instance=dg.DagsterInstance.ephemeral(), resources=res,
                            selection=["memory_snapshot", "emotion_catalog"], raise_on_error=False)
    assert result.success, failures(result)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/amygdala-test/out/snapshot/memory_snapshot.parquet")
    assert fs.exists("/amygdala-test/out/catalog/emotion_catalog.parquet")
    fs.rm("/amygdala-test", recursive=True)


def test_freshness_window_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from amygdala_dagster.pipeline.assets.common import readout_freshness

    monkeypatch.setenv("AMYGDALA_FRESHNESS_HOURS", "6")
    assert readout_freshness().fail_window.to_timedelta() == timedelta(hours=6)
    monkeypatch.setenv("AMYGDALA_FRESHNESS_HOURS", "soon")
    with pytest.raises(ValueError, match="AMYGDALA_FRESHNESS_HOURS"):
        readout_freshness()


def test_command_flags_override_environment_defaults_only_where_given(monkeypatch):
    import argparse

    from amygdala_dagster.commands import backfill_emotion, run

    monkeypatch.setenv("AMYGDALA_MODEL", "/models/custom")
    monkeypatch.setenv("AMYGDALA_EMOTIONS", "joy, awe")
    parser = argparse.ArgumentParser()
    run.configure(parser)
    res = run.build_resources(parser.parse_args([]))
    assert res["model"].model == "/models/custom" and res["model"].device == "auto"
    assert res["selection"].curated == ["joy", "awe"] and res["selection"].min_positives == 10

    parser = argparse.ArgumentParser()
    backfill_emotion.configure(parser)
    args = parser.parse_args(["nostalgia", "--emotions", "calm", "--min-positives", "4", "--model", "minilm"])
    res = run.build_resources(args)
    # a backfilled emotion is curated for its run, beside the environment's and the flag's
    assert res["selection"].curated == ["joy", "awe", "calm", "nostalgia"]
    assert res["selection"].min_positives == 4 and res["model"].model == "minilm"


def test_instance_is_created_under_a_dagster_home_that_does_not_exist_yet(tmp_path, monkeypatch):
    from amygdala_dagster.pipeline.runner import get_instance

    home = tmp_path / "not" / "yet"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with get_instance() as instance:
        assert home.is_dir() and instance.root_directory == str(home)


def test_memory_token_from_the_documented_variables_works_in_planning_sensor_and_run(
        graph_server, tmp_path, monkeypatch):
    """`AMYGDALA_MEMORY_MCP_URL=... AMYGDALA_MEMORY_TOKEN=t amygdala run` read the token outside a run."""
    from amygdala_dagster.pipeline.definitions import default_resources
    from amygdala_dagster.pipeline.runner import observe_graph
    from amygdala_dagster.pipeline.sensors import memory_graph_sensor, plan_partitions

    token = "s3cret-token-from-the-environment"
    server = graph_server(small_graph(4), token_env="AMYGDALA_MEMORY_TOKEN", token=token)
    monkeypatch.setenv("AMYGDALA_MEMORY_MCP_URL", server.url)
    monkeypatch.setenv("AMYGDALA_MEMORY_TOKEN", token)
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(tmp_path / "out"))
    res = default_resources()
    instance = dg.DagsterInstance.ephemeral()
    # outside a run: what `amygdala run` does before launching it
    assert observe_graph(instance, res).node_count == 16
    assert plan_partitions(res["memory"], R.SelectionResource(min_positives=3), [])[0]
    # a sensor tick
    with dg.build_sensor_context(instance=instance, resources={"memory": res["memory"],
                                                               "selection": R.SelectionResource(min_positives=3)}) as ctx:
        assert isinstance(memory_graph_sensor(ctx), dg.SensorResult)
    # a run with the resources of the code location (what the launchpad uses)
    result = dg.materialize(ALL_ASSETS + ALL_CHECKS, instance=instance, resources=res,
                            selection=["memory_snapshot"], raise_on_error=False)
    assert result.success, failures(result)
    records = instance.get_records_for_run(result.run_id).records
    text = "\n".join(repr(r.event_log_entry) for r in records) + repr(instance.get_run_by_id(result.run_id))
    assert token not in text
