"""The Dagster layer end to end: the whole asset graph on a small graph with the bundled MiniLM.

One module-scoped run materialises everything (three emotion partitions in one
run); tests only read its files and instance. A test that changes state runs
on its own directory and instance (it may share the activation cache, which
only makes its forward passes free).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from amygdala_dagster.commands.cli import main as cli_main
from amygdala_dagster.data import conversation_snippets_path
from amygdala_dagster.pipeline import resources as R
from amygdala_dagster.pipeline.assets import ALL_ASSETS
from amygdala_dagster.pipeline.runner import RunRefused, backfill_emotions, failures, materialize_all, step_metadata
from amygdala_dagster.readout.manifest import load_readout
from amygdala_dagster.workflow.layout import stats_info_file
from amygdala_dagster.workflow.partitions import NotQualifiedError
from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph

warnings.filterwarnings("ignore", category=dg.BetaWarning)

EMOTIONS = ["curiosity", "frustration", "warmth"]
BLOCKING = {"snapshot_nonempty_unique_keys", "examples_clean_and_disjoint", "examples_min_positives",
            "stats_finite", "vectors_finite_unit_norm", "manifest_matches_vectors"}


#: The bundled conversation snippets, forwarded with the examples (pooled, and per token as conversations).
N_SNIPPETS = sum(1 for line in conversation_snippets_path().read_text().splitlines() if line.strip())


def make_resources(graph: Path, out: str, cache: Path, **selection) -> dict:
    return {
        "memory": R.MemoryGraphResource(file=str(graph)),
        "model": R.ModelResource(model="minilm", device="cpu", cache_dir=str(cache)),
        "storage": R.ArtifactStorage(base_path=out),
        "selection": R.SelectionResource(min_positives=3, **selection),
        # the small graph's texts have about 15 tokens: the episode rule decides from the 4th, not the 32nd
        "evaluation": R.EvaluationResource(bootstrap=20, episode_min_tokens=4),
        "sharding": R.ShardingResource(),
    }


def check_results(result) -> dict[str, bool]:
    return {
        e.event_specific_data.check_name: e.event_specific_data.passed
        for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def run_logs(instance, result) -> str:
    return "\n".join(r.event_log_entry.user_message for r in instance.get_records_for_run(result.run_id).records)


def wonder_graph_run(tmp: Path, cache: Path):
    """A full run on the small graph whose curiosity nodes also carry wonder:9 (max_emotions=3 keeps it out)."""
    graph = write_graph(tmp / "graph.jsonl", small_graph(8, wonder_on_curiosity=True))
    res = make_resources(graph, str(tmp / "out"), cache, max_emotions=3)
    instance = dg.DagsterInstance.ephemeral()
    return {"tmp": tmp, "graph": graph, "res": res, "instance": instance, "result": materialize_all(res, instance)}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    return wonder_graph_run(tmp, tmp / "cache")


@pytest.mark.slow
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
    assert set(checks) >= BLOCKING and all(checks[c] for c in BLOCKING), checks
    assert {"separation_above_threshold", "better_than_baseline"} <= set(checks)
    # one GPU step for the three partitions loaded the weights, forwarded every text once, and released them
    assert result.job_def.name == "full_refresh"
    steps = [e for e in result.all_events if e.event_type_value == "STEP_SUCCESS" and e.step_key == "activation_stats"]
    assert len(steps) == 1
    stats = step_metadata(result, "activation_stats")
    assert stats["model_weights_loaded"] is True
    assert run_logs(instance, result).count("released the weights of model minilm") == 1
    # every example text and every bundled snippet once; the per-token samples came out of the same forwards
    assert stats["texts_forwarded"] == stats["unique_texts"] == 32 + N_SNIPPETS and stats["texts_cached"] == 0
    assert stats["per_token_sequences_forwarded"] == stats["per_token_sequences"] > N_SNIPPETS
    assert stats["per_token_only_forwards"] == 0
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


@pytest.mark.slow
def test_each_partition_of_the_one_step_carries_its_own_metadata(full_run):
    """Per-emotion counts and hashes land on each emotion partition's materialization, not a shared copy."""
    instance, out = full_run["instance"], full_run["tmp"] / "out"
    seen = {}
    for e in EMOTIONS:
        ex = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("tagged_examples"), asset_partitions=[e]), limit=1
        ).records[0].asset_materialization.metadata
        st = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("activation_stats"), asset_partitions=[e]), limit=1
        ).records[0].asset_materialization.metadata
        info = json.loads((out / stats_info_file(e)).read_text())
        assert st["stats_sha256"].value == info["stats_sha256"] and st["train_positives"].value == info["pos_n"]
        assert ex["examples_sha256"].value == st["examples_sha256"].value == info["examples_sha256"]
        assert ex["positives"].value >= st["train_positives"].value > 0 and e in ex["path"].value
        seen[e] = info["stats_sha256"]
    assert len(set(seen.values())) == len(EMOTIONS)


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


@pytest.mark.slow
def test_backfill_of_new_emotion_forwards_nothing_when_texts_are_cached(full_run, tmp_path):
    # its own run and instance; the cache of the module's run makes every text a cache hit
    own = wonder_graph_run(tmp_path, full_run["tmp"] / "cache")
    instance = own["instance"]
    # a warm rerun of the whole graph: every input (examples, snippets, per-token samples) is cached
    warm = step_metadata(own["result"], "activation_stats")
    assert (warm["texts_forwarded"], warm["per_token_sequences_forwarded"]) == (0, 0)
    assert warm["model_weights_loaded"] is False
    result = backfill_emotions(["wonder"], own["res"], instance)
    assert result.success, failures(result)
    assert result.job_def.name == "emotion_backfill"
    assert "wonder" in instance.get_dynamic_partitions("emotion")
    stats = step_metadata(result, "activation_stats")
    assert stats["texts_forwarded"] == 0 and stats["texts_cached"] > 0
    assert stats["per_token_sequences_forwarded"] == 0  # the calibration sample and conversations are kept
    # every input was cached: the fingerprint came from config + tokenizer, no weights were read
    assert stats["model_weights_loaded"] is False
    assert "loaded the weights" not in run_logs(instance, result)

    # the threshold rule of the manifest is configurable (here a fixed false-positive rate), and the token
    # calibration can be set on runtime-like traffic (--calibration-texts): only those new texts are forwarded,
    # once, by the GPU step
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"text": f"User: message number {i}. Assistant: reply {i}."}) + "\n"
                               for i in range(12)), encoding="utf-8")
    res = {**own["res"], "evaluation": R.EvaluationResource(bootstrap=0, threshold_method="fixed_fpr",
                                                            target_fpr=0.1, calibration_texts=str(traffic))}
    result = backfill_emotions(["wonder"], res, instance)
    assert result.success, failures(result)
    stats = step_metadata(result, "activation_stats")
    assert (stats["texts_forwarded"], stats["per_token_sequences_forwarded"]) == (0, 12)
    assert stats["model_weights_loaded"] is True and run_logs(instance, result).count("released the weights") == 1
    # the drift of every direction since the previous readout is numeric metadata
    vec = step_metadata(result, "readout_vectors")
    assert 0.99 < vec["min_drift_cosine"] <= 1.0 + 1e-9 and vec["n_new_concepts"] == 0
    out = tmp_path / "out"
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
            tok = manifest["per_concept"][concept]["layers"][str(layer)]["token_calibration"]
            assert tok["source"] == "calibration_texts:traffic.jsonl", (concept, layer)


def test_bad_threshold_method_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="threshold_method 'f1'"):
        R.EvaluationResource(threshold_method="f1").threshold()


@pytest.mark.slow
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
    result = dg.materialize(ALL_ASSETS, instance=instance, resources=res,
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
    result = dg.materialize(ALL_ASSETS, instance=dg.DagsterInstance.ephemeral(), resources=res,
                            selection=["memory_snapshot", "emotion_catalog"], raise_on_error=False)
    assert check_results(result)["snapshot_nonempty_unique_keys"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"memory_snapshot"}  # emotion_catalog never ran


def test_artifacts_go_to_an_fsspec_url(tmp_path):
    import fsspec

    graph = write_graph(tmp_path / "g.jsonl", small_graph(4))
    res = make_resources(graph, "memory://amygdala-test/out", tmp_path / "cache")
    result = dg.materialize(ALL_ASSETS, instance=dg.DagsterInstance.ephemeral(), resources=res,
                            selection=["memory_snapshot", "emotion_catalog"], raise_on_error=False)
    assert result.success, failures(result)
    fs = fsspec.filesystem("memory")
    assert fs.exists("/amygdala-test/out/snapshot/memory_snapshot.parquet")
    assert fs.exists("/amygdala-test/out/catalog/emotion_catalog.parquet")
    fs.rm("/amygdala-test", recursive=True)
    # the catalog says where each emotion comes from: the small graph's pattern nodes carry every emotion
    meta = step_metadata(result, "emotion_catalog")
    assert "source" in [c.name for c in meta["emotions"].schema.columns]
    assert meta["sources"].startswith("curated: 0, both: 3")
    assert meta["parameters"]["core_node_types"] == ["core", "core-personality", "pattern"]


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


@pytest.mark.slow
def test_memory_token_from_the_documented_variables_works_in_planning_sensor_and_run(
        graph_server, tmp_path, monkeypatch):
    """`AMYGDALA_MEMORY_MCP_URL=... AMYGDALA_MEMORY_TOKEN=t amygdala run` read the token outside a run."""
    from amygdala_dagster.pipeline.definitions import default_resources
    from amygdala_dagster.pipeline.jobs import plan_from_graph
    from amygdala_dagster.pipeline.runner import observe_graph
    from amygdala_dagster.pipeline.sensors import memory_graph_sensor

    token = "s3cret-token-from-the-environment"
    server = graph_server(small_graph(4), token_env="AMYGDALA_MEMORY_TOKEN", token=token)
    monkeypatch.setenv("AMYGDALA_MEMORY_MCP_URL", server.url)
    monkeypatch.setenv("AMYGDALA_MEMORY_TOKEN", token)
    monkeypatch.setenv("AMYGDALA_OUTPUT_DIR", str(tmp_path / "out"))
    res = default_resources()
    instance = dg.DagsterInstance.ephemeral()
    # outside a run: what `amygdala run` does before launching it
    assert observe_graph(instance, res).node_count == 16
    assert plan_from_graph(res["memory"], R.SelectionResource(min_positives=3), []).new
    # a sensor tick
    sensor_resources = {"memory": res["memory"], "sharding": res["sharding"],
                        "selection": R.SelectionResource(min_positives=3)}
    with dg.build_sensor_context(instance=instance, resources=sensor_resources) as ctx:
        assert isinstance(memory_graph_sensor(ctx), dg.SensorResult)
    # a run with the resources of the code location (what the launchpad uses)
    result = dg.materialize(ALL_ASSETS, instance=instance, resources=res,
                            selection=["memory_snapshot"], raise_on_error=False)
    assert result.success, failures(result)
    records = instance.get_records_for_run(result.run_id).records
    text = "\n".join(repr(r.event_log_entry) for r in records) + repr(instance.get_run_by_id(result.run_id))
    assert token not in text


@pytest.mark.slow
def test_a_non_qualifying_backfill_is_refused_before_its_partition_exists_and_leftovers_do_not_block(tmp_path):
    """`backfill-emotion saudade` (0 positives) used to register the partition and poison later runs."""
    cache = tmp_path / "cache"
    own = wonder_graph_run(tmp_path, cache)
    instance, res = own["instance"], own["res"]
    assert own["result"].success
    with pytest.raises(NotQualifiedError, match=r"'saudade' does not qualify: 0 eligible positive.*--min-positives"):
        backfill_emotions(["saudade"], res, instance)
    assert "saudade" not in instance.get_dynamic_partitions("emotion")
    # partitions left by older versions: one without positives, one whose name fails validation
    instance.add_dynamic_partitions("emotion", ["saudade", "bad name!"])
    result = backfill_emotions(["wonder"], res, instance)
    assert result.success, failures(result)
    assert set(instance.get_dynamic_partitions("emotion")) == set(EMOTIONS + ["wonder"])
    # a partition registered but never materialised does not block the all-emotion readout either
    instance.add_dynamic_partitions("emotion", ["calm"])
    result = dg.materialize(ALL_ASSETS, instance=instance, resources=res,
                            selection=["readout_vectors"], raise_on_error=False)
    assert result.success, failures(result)
    assert step_metadata(result, "readout_vectors")["left_out_partitions"] == "calm"


def test_a_graph_with_nothing_to_train_is_refused_before_a_run(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    empty = write_graph(tmp_path / "empty.jsonl", [])
    with pytest.raises(RunRefused, match="no usable node"):
        materialize_all(make_resources(empty, str(tmp_path / "out"), tmp_path / "cache"), instance)
    few = write_graph(tmp_path / "few.jsonl", small_graph(2))
    with pytest.raises(RunRefused, match=r"no emotion qualifies.*needs 3 eligible positives.*--min-positives"):
        materialize_all(make_resources(few, str(tmp_path / "out"), tmp_path / "cache"), instance)
    assert not instance.get_runs() and not instance.get_dynamic_partitions("emotion")


def test_run_command_refuses_unwritable_outputs_and_never_passes_off_an_old_pair(tmp_path, monkeypatch, capsys):

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # a file where the output directory should be: one line naming it, before the graph or model is touched
    assert cli_main(["run", "--output-dir", str(blocker / "out"), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"amygdala run: cannot write --output-dir {blocker / 'out'}")
    assert not (tmp_path / "cache").exists()
    # nothing to train: exit 2, the cause first, and the old pair is named as old
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"created_at": "2020-01-01T00:00:00Z"}')
    few = write_graph(tmp_path / "few.jsonl", small_graph(2))
    rc = cli_main(["run", "--memory-file", str(few), "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [layer for layer in err.splitlines() if not layer.startswith("20")]  # log lines carry a timestamp
    assert lines[0].startswith("amygdala run: no emotion qualifies")
    assert "from 2020-01-01T00:00:00Z, not from this run" in lines[1]


@pytest.mark.slow
def test_manifest_carries_token_calibration_and_report_the_runtime_section(full_run, weight_reads):
    out = full_run["tmp"] / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    for concept in manifest["concepts"]:
        for layer in manifest["layers"]:
            tok = manifest["per_concept"][concept]["layers"][str(layer)]["token_calibration"]
            assert tok["source"] == "holdout_negatives" and tok["target_rate"] == 0.01
            assert tok["n_tokens"] > 0 and np.isfinite(tok["threshold"]) and tok["heldout"]["n_tokens"] > 0
            assert set(tok["quantiles"]) == {"0.5", "0.9", "0.99", "0.999"}
            ep = manifest["per_concept"][concept]["layers"][str(layer)]["episode"]
            assert ep["source"] == "holdout_negatives" and ep["false_alarm_rate"] == 0.05
            assert (ep["half_life_tokens"], ep["min_tokens"], ep["statistic"]) == (128.0, 4, "ewm")
            assert ep["n_texts"] >= 2 and np.isfinite(ep["threshold"]) and ep["heldout"]["n_texts"] == ep["n_texts"]
    checks = check_results(full_run["result"])
    assert "token_threshold_heldout_rate" in checks and "episode_rule_heldout_rate" in checks
    meta = step_metadata(full_run["result"], "readout_manifest")
    assert "token_calibration" in meta and "episode_rules" in meta
    evaluation = json.loads((out / "report" / "evaluation.json").read_text())
    per = evaluation["conversations"]["per_emotion"]
    assert set(EMOTIONS) <= set(per) and per["frustration"]["n_with"] == 5
    ep = per["frustration"]["episode"]
    assert ep["n_with"] == 5 and ep["target_rate"] == 0.05 and 0 <= ep["false_alarm_rate"] <= 1
    assert ep["auroc_ci"] is not None and len(ep["hit_ci"]) == 2
    assert evaluation["catalog"]["emotions"]["frustration"]["source"] in ("tags", "both", "core/pattern")
    assert "Runtime: per-token readout on conversations" in (out / "report" / "evaluation.html").read_text()
    assert "runtime_conversations" in step_metadata(full_run["result"], "evaluation_report")
    # `amygdala report` rebuilds the runtime section from the per-token cache the run filled: no weights read
    weights0 = weight_reads.count
    rep = full_run["tmp"] / "rebuilt"
    assert cli_main(["report", "--output-dir", str(out), "--bootstrap", "0", "--report-dir", str(rep)]) == 0
    assert weight_reads.count == weights0
    rebuilt = json.loads((rep / "evaluation.json").read_text())["conversations"]["per_emotion"]
    for e in EMOTIONS:
        assert rebuilt[e]["token_auroc"] == pytest.approx(per[e]["token_auroc"])
        assert rebuilt[e]["episode"]["false_alarm_rate"] == pytest.approx(per[e]["episode"]["false_alarm_rate"])
    assert json.loads((rep / "evaluation.json").read_text())["catalog"] == evaluation["catalog"]


@pytest.mark.slow
def test_two_shards_run_as_parallel_processes_and_give_the_same_vectors(full_run, tmp_path, monkeypatch):
    """--shards 2: two shard steps in their own processes (multiprocess executor, persistent instance) forward
    each unique text exactly once into a fresh cache; activation_stats then reads it; the bytes match one shard."""
    from dagster._core.instance.ref import InstanceRef

    from amygdala_dagster.files.atomic import sha256_file
    from amygdala_dagster.pipeline.jobs import SHARDED

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    res = make_resources(full_run["graph"], str(tmp_path / "out"), tmp_path / "cache", max_emotions=3)
    res["sharding"] = R.ShardingResource(shards=2)
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 2)
        result = materialize_all(res, instance)
        assert result.success, failures(result)
        shard_steps = [e for e in result.all_events if e.event_type_value == "STEP_SUCCESS"
                       and e.step_key.startswith("activation_cache.forward_activation_shard")]
        assert len(shard_steps) == 2
        pids = {e.pid for e in result.all_events if e.step_key and "forward_activation_shard" in e.step_key
                and e.event_type_value == "STEP_START"}
        assert len(pids) == 2  # each shard in its own process
    shards = step_metadata(result, SHARDED[0].to_user_string())
    stats = step_metadata(result, "activation_stats")
    per_shard = [int(x) for x in str(shards["forwarded_per_shard"]).split(", ")]
    assert len(per_shard) == 2 and all(n > 0 for n in per_shard)
    assert sum(per_shard) == shards["unique_texts"] == stats["unique_texts"] == 32 + N_SNIPPETS  # each text once
    assert stats["texts_forwarded"] == 0 and stats["model_weights_loaded"] is False  # read from the cache
    one, two = full_run["tmp"] / "out" / "vectors.safetensors", tmp_path / "out" / "vectors.safetensors"
    assert sha256_file(two) == sha256_file(one)
