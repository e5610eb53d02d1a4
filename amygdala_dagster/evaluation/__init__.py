"""Evaluation of readout vectors: held-out separation, calibration, layer sweep,
estimator comparison, cross-talk, confounds, generalisation, and the report.

Stage 5, on top of the readout (the metrics themselves are :mod:`amygdala_dagster.readout.metrics`):
- :mod:`.core`: :func:`evaluate` and friends, reading activations from the cache;
- :mod:`.verdicts`: :func:`judge` / :func:`apply_verdicts`, the one source of per-emotion verdicts and flags;
- :mod:`.generalisation`: the out-of-distribution snippets each vector scores highest and lowest;
- :mod:`.conversations`: the runtime section, labelled conversations read per token and by the episode rule;
- :mod:`.report`: the HTML report and PNG plots (imports matplotlib, lazily);
- :mod:`.trace`: per-token trace records and the trace page;
- :mod:`.html`: the one Jinja2 environment both pages render through (templates in ``templates/``).
"""

from amygdala_dagster.evaluation.core import (
    DEFAULT_ESTIMATORS,
    resolve_estimators,
    calibration_for_manifest,
    crosstalk,
    evaluate,
    evaluate_emotion,
    json_clean,
)
from amygdala_dagster.evaluation.confounds import confounds
from amygdala_dagster.evaluation.layer_sweep import sweep_layers
from amygdala_dagster.evaluation.generalisation import generalisation, read_snippets
from amygdala_dagster.evaluation.verdicts import Criteria, apply_verdicts, attention_order, judge
from amygdala_dagster.readout.metrics import (
    accuracy_at,
    auroc,
    bootstrap_auroc_ci,
    calibration,
    cohens_d,
    probability,
    threshold_fixed_fpr,
    threshold_max_f1,
    z_score,
)


def write_report(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy wrapper, see report.write_report
    from amygdala_dagster.evaluation.report import write_report as _write_report

    return _write_report(*args, **kwargs)


def summary_markdown(*args, **kwargs):  # noqa: ANN002, ANN003 - see report.summary_markdown
    from amygdala_dagster.evaluation.report import summary_markdown as _summary_markdown

    return _summary_markdown(*args, **kwargs)


__all__ = [
    "Criteria", "DEFAULT_ESTIMATORS", "accuracy_at", "apply_verdicts", "attention_order", "judge", "resolve_estimators", "auroc", "bootstrap_auroc_ci", "calibration",
    "calibration_for_manifest", "cohens_d", "confounds", "crosstalk", "evaluate", "evaluate_emotion",
    "generalisation", "json_clean", "probability", "read_snippets", "summary_markdown", "sweep_layers",
    "threshold_fixed_fpr", "threshold_max_f1", "write_report", "z_score",
]
