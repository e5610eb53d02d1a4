"""The episode rule (Contract 3 ``episode``): is the model in emotion E in this conversation, now?

One token over the token threshold answers it badly: with many concepts
several fire on every message. The episode rule reads a streaming statistic
of a concept's per-token projections instead, and its threshold is set so
that a stated share of conversations *without* the emotion ever raise it.

The statistic, per concept and layer, over the scored positions of one
sequence (not a special token and not among the first ``skip_first_tokens``
positions, as for the token calibration), with ``x`` the raw projection
``h_layer[t] . vectors[c]`` of the ``n``-th scored token::

    w   = 2 ** (-1 / half_life_tokens)         (w = 1 when half_life_tokens is null: the cumulative mean)
    num = w * num + x ;  den = w * den + 1     (both start at 0)
    s   = num / den                            (an exponentially weighted mean of the projections so far)

A position that is not scored leaves the state as it is. The rule decides at
every scored token once ``n >= min_tokens``: it is *active* while
``s >= threshold``, and the episode has *fired* from the first active token
on (the decision at token t uses tokens <= t only). ``score`` is ``s`` after
the last token.

The threshold is calibrated on episodes without the emotion (each concept's
held-out negatives, or the ``--calibration-texts`` records not labelled with
it): the *peak* of ``s`` over the positions where the rule decides is taken
per episode, and the threshold is the ``k``-th smallest of the ``N`` peaks,
``k = ceil((1 - rate) * (N + 1))`` -- the conformal order statistic, under
which a new episode from the same distribution fires with probability at most
``rate``. With ``N < 1 / rate - 1`` episodes no order statistic guarantees the
rate; the largest peak is used and ``rate_bound`` says ``1 / (N + 1)``.
Episodes shorter than ``min_tokens`` scored tokens can never fire and are not
counted. ``heldout`` measures the rule on episodes not used to set it
(cross-fitting by text, as the token calibration's ``heldout``).

:class:`EpisodeState` applies the rule token by token (what code beside vLLM
does); :func:`statistic` gives the same numbers for a whole sequence at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.signal import lfilter

from amygdala_dagster.readout.folds import text_folds
from amygdala_dagster.readout.manifest import calibration_entry
from amygdala_dagster.readout.metrics import wilson_interval

#: The chosen statistic (benchmarks/episode.py measured EWM half-lives, windowed and cumulative means).
STATISTIC = "ewm"
DEFAULT_HALF_LIFE_TOKENS = 128.0
DEFAULT_MIN_TOKENS = 32
DEFAULT_FALSE_ALARM_RATE = 0.05
DEFAULT_FOLDS = 5


def decay(half_life_tokens: float | None) -> float:
    """The per-token weight ``w`` of the exponentially weighted mean (1.0: the cumulative mean)."""
    if half_life_tokens is None:
        return 1.0
    if not half_life_tokens > 0:
        raise ValueError(f"episode half-life must be > 0 tokens (or None for the cumulative mean), "
                         f"got {half_life_tokens}")
    return float(2.0 ** (-1.0 / float(half_life_tokens)))


def statistic(x: np.ndarray, half_life_tokens: float | None) -> np.ndarray:
    """``s`` after each of the scored projections ``x`` (``[n]`` or ``[n, C]``, along axis 0)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] == 0:
        return x.copy()
    w = decay(half_life_tokens)
    num = np.cumsum(x, axis=0) if w == 1.0 else lfilter([1.0], [1.0, -w], x, axis=0)
    n = np.arange(1, x.shape[0] + 1, dtype=np.float64)
    den = n if w == 1.0 else (1.0 - w ** n) / (1.0 - w)  # the sum of w**k for k < n
    return num / den.reshape((-1,) + (1,) * (x.ndim - 1))


def peak(x: np.ndarray, half_life_tokens: float | None, min_tokens: int) -> float | None:
    """The largest ``s`` where the rule decides (``n >= min_tokens``); None for a shorter episode."""
    if len(x) < max(int(min_tokens), 1):
        return None
    return float(statistic(x, half_life_tokens)[max(int(min_tokens), 1) - 1:].max())


def conformal_threshold(peaks: Sequence[float], rate: float) -> tuple[float, int, float | None]:
    """``(threshold, k, rate_bound)``: the ``k``-th smallest peak, ``k = ceil((1 - rate)(N + 1))`` (the
    largest when that exceeds N: then no bound holds and ``rate_bound`` is None)."""
    p = np.sort(np.asarray(peaks, dtype=np.float64))
    n = p.size
    if n == 0:
        raise ValueError("no calibration episode reaches min_tokens scored tokens")
    k = math.ceil((1.0 - rate) * (n + 1) - 1e-12)
    if k > n:
        return float(p[-1]), n, None
    return float(p[k - 1]), k, (n + 1 - k) / (n + 1)


def calibrate_episode(
    values: Sequence[np.ndarray], keys: Sequence[str], *, source: str, skip_first_tokens: int,
    half_life_tokens: float | None = DEFAULT_HALF_LIFE_TOKENS, min_tokens: int = DEFAULT_MIN_TOKENS,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, n_folds: int = DEFAULT_FOLDS,
    token_calibration: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The ``episode`` entry from per-episode arrays of scored-token projections (``values[i]`` is
    episode ``keys[i]``), see the module docstring; None when no episode reaches ``min_tokens``."""
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"episode false-alarm rate must be within (0, 1), got {false_alarm_rate}")
    if int(min_tokens) < 1:
        raise ValueError(f"episode min_tokens must be at least 1, got {min_tokens}")
    decay(half_life_tokens)
    peaks, kept, lengths = [], [], []
    for v, k in zip(values, keys):
        p = peak(v, half_life_tokens, min_tokens)
        lengths.append(len(v))
        if p is not None:
            peaks.append(p)
            kept.append(k)
    if not peaks:
        return None
    threshold, order_statistic, bound = conformal_threshold(peaks, false_alarm_rate)
    tc = token_calibration or {}
    z = None
    if tc.get("neg_std"):
        z = (threshold - float(tc["neg_mean"])) / float(tc["neg_std"])
    out: dict[str, Any] = {
        "statistic": STATISTIC, "half_life_tokens": None if half_life_tokens is None else float(half_life_tokens),
        "min_tokens": int(min_tokens), "skip_first_tokens": int(skip_first_tokens), "source": source,
        "n_texts": len(peaks), "n_short_texts": len(values) - len(peaks),
        "median_scored_tokens": float(np.median(lengths)),
        "false_alarm_rate": float(false_alarm_rate), "threshold": threshold, "threshold_z": z,
        "order_statistic": order_statistic, "rate_bound": bound, "heldout": None,
    }
    folds = text_folds(kept, n_folds)
    n_f = int(folds.max()) + 1 if len(kept) else 0
    if n_f >= 2:
        fires = 0
        arr = np.asarray(peaks)
        for f in range(n_f):
            thr, _, _ = conformal_threshold(arr[folds != f], false_alarm_rate)
            fires += int(np.sum(arr[folds == f] >= thr))
        rate = fires / len(arr)
        out["heldout"] = {"method": f"{n_f}-fold by text", "n_texts": len(arr), "n_fired": fires,
                          "false_alarm_rate": rate, "ratio_to_target": rate / false_alarm_rate}
    return out


# ----------------------------------------------------------------------------- applying it
def rule_arrays(manifest: Mapping[str, Any], layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(w, min_tokens, threshold)`` per concept of ``manifest`` at ``layer`` (threshold NaN for a
    concept without an episode rule); None when no concept has one (manifests before format 3)."""
    concepts = list(manifest["concepts"])
    w = np.ones(len(concepts))
    m = np.ones(len(concepts), dtype=np.int64)
    thr = np.full(len(concepts), np.nan)
    any_rule = False
    for i, c in enumerate(concepts):
        e = calibration_entry(manifest, c, layer, "episode")
        if not e or e.get("threshold") is None:
            continue
        any_rule = True
        w[i] = decay(e.get("half_life_tokens"))
        m[i] = int(e.get("min_tokens") or 1)
        thr[i] = float(e["threshold"])
    return (w, m, thr) if any_rule else None


@dataclass
class EpisodeTrace:
    """The rule over one sequence at one layer: per position ``[T, C]`` the statistic (NaN before the first
    scored token) and whether the rule is active there; per concept the end ``score``, ``fired`` and the
    position where it ``first`` fired (-1: never)."""

    stat: np.ndarray
    active: np.ndarray
    score: np.ndarray
    fired: np.ndarray
    first: np.ndarray
    peak: np.ndarray


class EpisodeState:
    """The streaming state of every concept's rule at one layer: feed it tokens as they come.

    ``update`` takes the raw projections ``[T, C]`` of the next tokens and which of them are scored,
    and may be called any number of times (a prefill, then each decode step): the result is the same as
    one call over the whole sequence.
    """

    def __init__(self, w: np.ndarray, min_tokens: np.ndarray, threshold: np.ndarray) -> None:
        self.w = np.asarray(w, np.float64)
        self.min_tokens = np.asarray(min_tokens, np.int64)
        self.threshold = np.asarray(threshold, np.float64)
        c = self.w.size
        self.num = np.zeros(c)
        self.den = np.zeros(c)
        self.n = 0
        self.position = 0
        self.first = np.full(c, -1, dtype=np.int64)
        self.peak = np.full(c, np.nan)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], layer: int) -> EpisodeState | None:
        arrays = rule_arrays(manifest, layer)
        return cls(*arrays) if arrays is not None else None

    @property
    def score(self) -> np.ndarray:
        """``s`` now (NaN before the first scored token)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.den > 0, self.num / np.where(self.den > 0, self.den, 1.0), np.nan)

    @property
    def fired(self) -> np.ndarray:
        return self.first >= 0

    def update(self, raw: np.ndarray, scored: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(stat [T, C], active [T, C])`` for the next ``T`` tokens; the state moves past them."""
        raw = np.asarray(raw, np.float64).reshape(len(scored), self.w.size)
        stat = np.full(raw.shape, np.nan)
        active = np.zeros(raw.shape, dtype=bool)
        for t, ok in enumerate(scored):
            if ok:
                self.num = self.w * self.num + raw[t]
                self.den = self.w * self.den + 1.0
                self.n += 1
                s = self.num / self.den
                deciding = self.n >= self.min_tokens
                act = deciding & (s >= self.threshold)
                active[t] = act
                self.first = np.where(act & (self.first < 0), self.position, self.first)
                self.peak = np.where(deciding, np.fmax(self.peak, s), self.peak)
            if self.n:
                stat[t] = self.num / self.den
            self.position += 1
        return stat, active

    def trace(self, raw: np.ndarray, scored: Sequence[bool] | np.ndarray) -> EpisodeTrace:
        """:meth:`update` over a whole sequence, with the per-concept results."""
        stat, active = self.update(raw, scored)
        return EpisodeTrace(stat=stat, active=active, score=self.score, fired=self.fired, first=self.first.copy(),
                            peak=self.peak.copy())


def episode_traces(raw: Mapping[int, np.ndarray], scored: Sequence[bool] | np.ndarray, manifest: Mapping[str, Any]
                   ) -> dict[int, EpisodeTrace]:
    """The rule over one sequence at every layer of ``raw`` (``{layer: [T, C]}``) that has episode rules."""
    out = {}
    for layer, r in raw.items():
        state = EpisodeState.from_manifest(manifest, int(layer))
        if state is not None:
            out[int(layer)] = state.trace(r, scored)
    return out


class EpisodeTracker:
    """:class:`EpisodeState` of every hooked layer of a readout, for one conversation as it streams."""

    def __init__(self, manifest: Mapping[str, Any], layers: Sequence[int]) -> None:
        self.states = {int(layer): s for layer in layers
                       if (s := EpisodeState.from_manifest(manifest, int(layer))) is not None}

    def update(self, raw: Mapping[int, np.ndarray], scored: Sequence[bool] | np.ndarray
               ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{layer: (stat [T, C], active [T, C])}`` for the next tokens' raw projections ``{layer: [T, C]}``."""
        return {layer: s.update(raw[layer], scored) for layer, s in self.states.items() if layer in raw}


# ----------------------------------------------------------------------------- reading and summaries
def episode_summary(rules: Mapping[str, Mapping[Any, Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """One row per concept and layer: the rule's threshold and its false-alarm rate on held-out episodes."""
    rows = []
    for concept, per in rules.items():
        for layer, e in per.items():
            held = (e or {}).get("heldout") or {}
            rows.append({"concept": concept, "layer": int(layer), "episodes": (e or {}).get("n_texts"),
                         "target_rate": (e or {}).get("false_alarm_rate"), "threshold_z": (e or {}).get("threshold_z"),
                         "heldout_false_alarm_rate": held.get("false_alarm_rate"),
                         "ratio_to_target": held.get("ratio_to_target")})
    return rows


def episode_problems(rules: Mapping[str, Mapping[Any, Mapping[str, Any] | None]]) -> list[str]:
    """Concepts/layers whose rule fires on more than its target share of held-out calibration episodes, beyond
    the 95% (Wilson) interval: a handful of episodes cannot raise it by chance."""
    out = []
    for concept, per in rules.items():
        for layer, entry in per.items():
            e = entry or {}
            held = e.get("heldout") or {}
            if not held:
                continue
            ci = wilson_interval(int(held["n_fired"]), int(held["n_texts"]))
            if ci is not None and ci[0] > float(e["false_alarm_rate"]):
                out.append(f"{concept} layer {int(layer)}: episode rule fires on {held['n_fired']} of "
                           f"{held['n_texts']} held-out calibration episodes ({held['false_alarm_rate']:.1%}, 95% "
                           f"interval [{ci[0]:.1%}, {ci[1]:.1%}]), above its target {e['false_alarm_rate']:.1%}")
    return out
