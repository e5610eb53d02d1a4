"""Confounds: would a trivial baseline separate an emotion's positives from its negatives as well as its vector?

The node-type mix and text lengths of positives vs negatives, and the held-out AUROC of "text length"
and "node type" as classifiers, beside which a vector's own AUROC is judged (:mod:`.verdicts`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from amygdala_dagster.examples.selection import Example, ExampleSet
from amygdala_dagster.readout import metrics as M


def _oriented_length_auroc(train_pos: Sequence[Example], train_neg: Sequence[Example],
                           hold_pos: Sequence[Example], hold_neg: Sequence[Example]) -> float:
    """Held-out AUROC of "text length" as a classifier, its sign chosen on the train split."""
    hp = np.array([len(e.text) for e in hold_pos], dtype=np.float64)
    hn = np.array([len(e.text) for e in hold_neg], dtype=np.float64)
    a = M.auroc(hp, hn)
    if not math.isfinite(a):
        return a
    if train_pos and train_neg:
        tp = np.mean([len(e.text) for e in train_pos])
        tn = np.mean([len(e.text) for e in train_neg])
        return a if tp >= tn else 1.0 - a
    return max(a, 1.0 - a)  # no train split to orient by: the baseline gets the benefit of the doubt


def _node_type_auroc(train_pos: Sequence[Example], train_neg: Sequence[Example],
                     hold_pos: Sequence[Example], hold_neg: Sequence[Example]) -> float:
    """Held-out AUROC of "node type" as a classifier: each type scores its train positive rate."""
    fit_pos, fit_neg = (train_pos, train_neg) if train_pos and train_neg else (hold_pos, hold_neg)
    cp = Counter(e.node_type for e in fit_pos)
    cn = Counter(e.node_type for e in fit_neg)
    prior = len(fit_pos) / max(len(fit_pos) + len(fit_neg), 1)

    def rate(t: str) -> float:
        n = cp[t] + cn[t]
        return cp[t] / n if n else prior

    return M.auroc([rate(e.node_type) for e in hold_pos], [rate(e.node_type) for e in hold_neg])


def confounds(example_set: ExampleSet) -> dict[str, Any]:
    """Node-type mix and text lengths of positives vs negatives, and trivial-baseline AUROCs."""
    tp, tn = example_set.train_positives, example_set.train_negatives
    hp, hn = example_set.holdout_positives, example_set.holdout_negatives
    return {
        "node_type_mix": {
            "positive": dict(sorted(Counter(e.node_type for e in example_set.positives).items())),
            "negative": dict(sorted(Counter(e.node_type for e in example_set.negatives).items())),
        },
        "text_length": {
            "positive": M.summarise_lengths([len(e.text) for e in example_set.positives]),
            "negative": M.summarise_lengths([len(e.text) for e in example_set.negatives]),
        },
        "baseline_auroc": {
            "length": _oriented_length_auroc(tp, tn, hp, hn),
            "node_type": _node_type_auroc(tp, tn, hp, hn),
        },
    }
