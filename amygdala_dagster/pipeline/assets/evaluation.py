"""Held-out evaluation of the shipped readout: separation, calibration, cross-talk, baselines, plots."""


import time
from typing import Any

import dagster as dg

from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.evaluation.conversations import conversations_section
from amygdala_dagster.evaluation.core import evaluate
from amygdala_dagster.evaluation.generalisation import read_snippets
from amygdala_dagster.evaluation.plots import png_markdown
from amygdala_dagster.evaluation.report import emotion_markdown, summary_markdown, write_report
from amygdala_dagster.evaluation.runtime_report import PLOT, runtime_markdown
from amygdala_dagster.evaluation.verdicts import apply_verdicts, log_unusable
from amygdala_dagster.examples.catalog import catalog_summary
from amygdala_dagster.pipeline.assets.common import GROUP, file_meta, json_hash, table
from amygdala_dagster.pipeline.assets.emotions import read_catalog_from, read_examples_from
from amygdala_dagster.pipeline.assets.graph import read_snapshot_from
from amygdala_dagster.pipeline.assets.readout_pair import read_samples, read_staged_info, readout_manifest
from amygdala_dagster.pipeline.checks import EVALUATION_CHECKS, evaluation_checks
from amygdala_dagster.pipeline.resources import ArtifactStorage, EvaluationResource
from amygdala_dagster.readout.manifest import load_readout
from amygdala_dagster.workflow.layout import MANIFEST_FILE, REPORT_DIR, VECTORS_FILE
from amygdala_dagster.workflow.samples import StoredSamples


@dg.asset(
    group_name=GROUP,
    deps=[readout_manifest],
    code_version="1",
    kinds={"html", "json"},
    check_specs=EVALUATION_CHECKS,
    description=(
        "Which vectors can be trusted: a verdict per emotion (use / weak / do not use) with its reasons, from "
        "held-out separation (AUROC with bootstrap interval, Cohen's d), trivial baselines, cross-talk and, on "
        "labelled conversations, the per-token readout as the runtime computes it. HTML + JSON report; the "
        "summary, verdicts and plots are in the metadata."
    ),
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    storage: ArtifactStorage,
    evaluation: EvaluationResource,
) -> dg.MaterializeResult:
    t0 = time.perf_counter()
    store = storage.store()
    info = read_staged_info(storage)
    readout = load_readout(store.uri(VECTORS_FILE), store.uri(MANIFEST_FILE))
    sets = {c: read_examples_from(storage, c)[1] for c in readout.concepts}
    snapshot = read_snapshot_from(storage)
    snippets_path = evaluation.snippets_path()
    snippets = read_snippets(snippets_path) if snippets_path else None
    with ActivationCache(info["cache_root"], info["fingerprint"]) as cache:
        result = evaluate(
            cache, sets, readout, snapshot=snapshot, snippets=snippets,
            bootstrap=evaluation.bootstrap, crosstalk_cosine=evaluation.crosstalk_cosine,
            estimators=evaluation.estimators, criteria=evaluation.criteria(), **evaluation.threshold(),
            meta={"vectors_sha256": readout.sha256, "dagster_run_id": context.run.run_id},
        )
    result["conversations"] = runtime_conversations(readout, result, read_samples(storage, info["fingerprint"]))
    result["catalog"] = report_catalog(storage, readout.concepts)
    apply_verdicts(result)
    log_unusable(result)
    with store.local_for_write(REPORT_DIR) as out:
        html_path, _json_path, plot_paths = write_report(result, out, histograms=evaluation.histograms)
        plots = {name: p.read_bytes() for name, p in plot_paths.items()}
    s = result["summary"]
    counts = s["verdict_counts"]
    # Per-emotion evaluation on each emotion partition's page (text; the histogram where one was drawn).
    for e in result["emotions"]:
        meta = {"evaluation": dg.MetadataValue.md(emotion_markdown(result, e)),
                "verdict": result["verdicts"][e]["verdict"], "vectors_sha256": readout.sha256}
        if f"hist_{e}.png" in plots:
            meta["projection_histogram"] = dg.MetadataValue.md(
                png_markdown(plots[f"hist_{e}.png"], f"{e} held-out projections"))
        context.log_event(dg.AssetObservation(asset_key=dg.AssetKey("activation_stats"), partition=e, metadata=meta))
    context.log.info(f"evaluation report: {store.uri(REPORT_DIR + '/' + html_path.name)}; "
                     f"{counts['use']} use, {counts['weak']} weak, {counts['do_not_use']} do not use")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(json_hash({k: v for k, v in result.items() if k != "created_at"})),
        check_results=evaluation_checks(result, float(evaluation.min_auroc)),
        metadata={
            "summary": dg.MetadataValue.md(summary_markdown(result)),
            "verdicts": table(verdict_rows(result)),
            # Numbers worth following over time (the Plots tab):
            **{k: dg.MetadataValue.float(_round(s[src])) for k, src in
               (("mean_held_out_auroc", "mean_best_auroc"), ("worst_held_out_auroc", "worst_best_auroc"))
               if s[src] is not None},
            "n_use": counts["use"], "n_weak": counts["weak"], "n_do_not_use": counts["do_not_use"],
            "n_flagged": int(s["n_flagged"]),
            "seconds": round(time.perf_counter() - t0, 1),
            "report": dg.MetadataValue.path(store.uri(f"{REPORT_DIR}/{html_path.name}")),
            "verdicts_plot": dg.MetadataValue.md(png_markdown(plots["verdicts.png"], "AUROC against holdout size")),
            "auroc_by_layer_plot": dg.MetadataValue.md(png_markdown(plots["auroc_by_layer.png"], "AUROC by layer")),
            "crosstalk_plot": dg.MetadataValue.md(png_markdown(plots["crosstalk.png"], "cross-talk vs co-occurrence")),
            **runtime_metadata(result, plots),
            **file_meta(store, REPORT_DIR),
        },
    )


def runtime_conversations(readout: Any, result: dict[str, Any], samples: StoredSamples) -> dict[str, Any] | None:
    """The report's runtime section: the readout per token on the labelled conversations the GPU step kept
    (None: no evaluation conversations)."""
    if samples.conversations is None:
        return None
    return conversations_section(samples.conversations, samples.tokens, readout, samples.layers, result)


def report_catalog(storage: ArtifactStorage, concepts: list[str]) -> dict[str, Any] | None:
    """Where each emotion of the readout comes from (the catalog's source), for the report; None without a
    catalog (a storage that never ran emotion_catalog)."""
    try:
        return catalog_summary(read_catalog_from(storage), concepts)
    except FileNotFoundError:
        return None


def runtime_metadata(result: dict[str, Any], plots: dict[str, bytes]) -> dict[str, Any]:
    """Dagster metadata of the runtime section (nothing when it was skipped); ``plots``: the report's PNGs."""
    if not result.get("conversations"):
        return {}
    out: dict[str, Any] = {"runtime_conversations": dg.MetadataValue.md(runtime_markdown(result))}
    if PLOT in plots:
        out["runtime_plot"] = dg.MetadataValue.md(png_markdown(plots[PLOT], "runtime: conversations"))
    return out


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def verdict_rows(result: dict) -> list[dict]:
    """One metadata-table row per emotion, most attention first, numbers at 3 significant digits, the
    reasons as flag names."""
    rows = []
    for e, v in result["verdicts"].items():
        r = result["emotions"][e]
        entry = r["layers"].get(str(r["best_layer"]), {}) if r["best_layer"] is not None else {}
        ci = entry.get("auroc_ci") or (None, None)
        rows.append({
            "emotion": e, "verdict": v["verdict"],
            "source": ((result.get("catalog") or {}).get("emotions") or {}).get(e, {}).get("source"),
            "best_layer": r["best_layer"],
            "auroc": None if r["best_auroc"] is None else _round(r["best_auroc"], 3),
            "ci_low": None if ci[0] is None else _round(ci[0], 3),
            "ci_high": None if ci[1] is None else _round(ci[1], 3),
            "holdout_pos": entry.get("n_pos"), "holdout_neg": entry.get("n_neg"),
            # Short flag names: a sentence per reason makes every row of the UI's narrow table dozens of
            # lines tall. The sentences are in `summary` (and the HTML report).
            "flags": ", ".join(v.get("flags") or []) or "none",
        })
    return rows
