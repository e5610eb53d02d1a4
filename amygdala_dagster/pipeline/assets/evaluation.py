"""Held-out evaluation of the shipped readout: separation, calibration, cross-talk, baselines, plots."""


import time

import dagster as dg

from amygdala_dagster.pipeline.assets.common import GROUP, MANIFEST_FILE, REPORT_DIR, VECTORS_FILE, file_meta, json_hash, table
from amygdala_dagster.pipeline.assets.emotions import read_examples_from
from amygdala_dagster.pipeline.assets.graph import read_snapshot_from
from amygdala_dagster.pipeline.assets.readout import load_staged_readout, readout_manifest
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource, ModelResource

EVALUATION_JSON = f"{REPORT_DIR}/evaluation.json"


@dg.asset(
    group_name=GROUP,
    deps=[readout_manifest],
    code_version="1",
    kinds={"html", "json"},
    description="Held-out separation (AUROC, CI, Cohen's d), calibration, cross-talk and baselines; HTML + JSON report.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    storage: ArtifactStorage,
    evaluation: EvaluationResource,
    model: ModelResource,
) -> dg.MaterializeResult:
    from amygdala_dagster.cache import ActivationCache, text_sha256
    from amygdala_dagster.evaluation import evaluate, read_snippets, summary_markdown, write_report
    from amygdala_dagster.evaluation.report import (
        emotion_markdown, plot_auroc_by_layer, plot_crosstalk, plot_histogram, png_markdown,
    )
    from amygdala_dagster.manifest import load_readout

    t0 = time.perf_counter()
    store = storage.store()
    _staged, info = load_staged_readout(storage)
    readout = load_readout(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE))
    sets = {c: read_examples_from(storage, c)[1] for c in readout.concepts}
    snapshot = read_snapshot_from(storage)
    snippets_path = evaluation.snippets_path()
    snippets = read_snippets(snippets_path) if snippets_path else None
    with ActivationCache(info["cache_root"], info["fingerprint"]) as cache:
        # The model is needed only for snippets not in the cache yet (normally just the first run).
        uncached = cache.missing([text_sha256(s["text"]) for s in snippets or []])
        engine = model.engine() if uncached else None
        if engine is not None and engine.fingerprint != info["fingerprint"]:
            raise ValueError(
                "the model resource does not match the one that produced the readout "
                f"(cache {cache.directory}); rematerialize activation_stats with the current model settings"
            )
        result = evaluate(
            cache, sets, readout, snapshot=snapshot, snippets=snippets, engine=engine,
            bootstrap=evaluation.bootstrap, confound_margin=evaluation.confound_margin,
            crosstalk_cosine=evaluation.crosstalk_cosine, **evaluation.threshold(),
            meta={"vectors_sha256": readout.sha256, "dagster_run_id": context.run.run_id},
        )
    with store.local_for_write(REPORT_DIR) as out:
        html_path, _json_path, plots = write_report(result, out)
    rows = []
    for e, r in result["emotions"].items():
        base = r["confounds"]["baseline_auroc"]
        rows.append({
            "emotion": e, "best_layer": r["best_layer"], "best_auroc": r["best_auroc"],
            "baseline_length": base.get("length"), "baseline_node_type": base.get("node_type"),
            "flagged": bool(r["confounds"].get("flagged")),
        })
    # Per-emotion evaluation on each emotion partition's page.
    for e in result["emotions"]:
        context.log_event(dg.AssetObservation(
            asset_key=dg.AssetKey("activation_stats"), partition=e,
            metadata={
                "evaluation": dg.MetadataValue.md(emotion_markdown(result, e)),
                "projection_histogram": dg.MetadataValue.md(png_markdown(plot_histogram(result, e), f"{e} held-out projections")),
                "vectors_sha256": readout.sha256,
            },
        ))
    context.log.info(f"evaluation report: {store.uri(REPORT_DIR + '/' + html_path.name)}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(json_hash({k: v for k, v in result.items() if k != "created_at"})),
        metadata={
            "summary": dg.MetadataValue.md(summary_markdown(result)),
            "per_emotion": table(rows),
            "mean_auroc_by_layer": {str(k): v for k, v in result["summary"]["mean_auroc_by_layer"].items()},
            "n_flagged": int(result["summary"]["n_flagged"]),
            "report": dg.MetadataValue.path(store.uri(f"{REPORT_DIR}/{html_path.name}")),
            "auroc_by_layer_plot": dg.MetadataValue.md(png_markdown(plot_auroc_by_layer(result), "AUROC by layer")),
            "crosstalk_plot": dg.MetadataValue.md(png_markdown(plot_crosstalk(result), "cross-talk vs co-occurrence")),
            "plots": ", ".join(sorted(plots)),
            "seconds": round(time.perf_counter() - t0, 3),
            **file_meta(store, REPORT_DIR),
        },
    )
