"""The seed's step 2 as functions: an examples directory -> the vectors + manifest pair (``train_steering_vectors``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import DEFAULT_SHARD_SIZE, ActivationCache
from amygdala_dagster.engine.forward import CacheRunStats
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.engine.token_sample import DEFAULT_SAMPLE_TOKENS
from amygdala_dagster.examples.directory import read_examples_dir
from amygdala_dagster.examples.selection import ExampleSet
from amygdala_dagster.readout.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from amygdala_dagster.readout.manifest import default_manifest_path, write_readout
from amygdala_dagster.readout.publish import check_publishable
from amygdala_dagster.readout.token_calibration import (
    DEFAULT_TARGET_RATE,
    calibrate_episodes,
    calibrate_readout,
    calibration_entries,
    project_calibration,
)
from amygdala_dagster.readout.vectors import train_readout
from amygdala_dagster.workflow.engine_settings import EngineSettings, SettingsError, build_engine, engine_report
from amygdala_dagster.workflow.layout import check_writable
from amygdala_dagster.workflow.partitions import collect_texts, untrainable
from amygdala_dagster.workflow.samples import RunSamples, calibration_sample, forward_run, held_out_negatives
from amygdala_dagster.workflow.settings import current_settings

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot proceed; the message names the emotion/flag/file."""


@dataclass
class TrainResult:
    vectors_path: Path
    manifest_path: Path
    manifest: dict[str, Any]
    cache_stats: CacheRunStats
    concepts: list[str]
    layers: list[int]
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_load_seconds: float = 0.0
    model_weights_loaded: bool = False
    cache_dir: str = ""
    #: :func:`engine_report` of the engine that ran (fast path, kernels, device map).
    engine: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary of the run (also what ``--json-summary`` writes)."""
        return {
            "vectors": str(self.vectors_path),
            "manifest": str(self.manifest_path),
            "vectors_sha256": self.manifest["vectors_sha256"],
            "concepts": self.concepts,
            "layers": self.layers,
            "skipped": self.skipped,
            "model": self.manifest["model"],
            "dtype": self.manifest["dtype"],
            "cache_dir": self.cache_dir,
            "activations": self.cache_stats.to_dict(),
            "model_load_seconds": round(self.model_load_seconds, 3),
            "model_weights_loaded": self.model_weights_loaded,
            **self.engine,
            "seconds": round(self.seconds, 3),
        }


def select_emotions(example_sets: Mapping[str, ExampleSet], emotions: Sequence[str] | None) -> dict[str, ExampleSet]:
    """The named subset of ``example_sets`` (all when ``emotions`` is empty); SettingsError names unknown ones."""
    if not emotions:
        return dict(example_sets)
    unknown = [e for e in emotions if e not in example_sets]
    if unknown:
        raise SettingsError(
            f"--emotions: {', '.join(map(repr, unknown))} not in the training data "
            f"(it has {', '.join(sorted(example_sets)) or 'no emotions'})"
        )
    return {e: example_sets[e] for e in dict.fromkeys(emotions)}


def train_readout_pair(
    engine: ActivationEngine,
    example_sets: Mapping[str, ExampleSet],
    cache: ActivationCache,
    output: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | None = None,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    vectors_dtype: str = "float32",
    skip_invalid: bool = False,
    progress: bool = True,
    training_info: Mapping[str, Any] | None = None,
    token_target_rate: float = DEFAULT_TARGET_RATE,
    calibration_tokens: int = DEFAULT_SAMPLE_TOKENS,
) -> TrainResult:
    """Forward every example text once (pooled; per token for the held-out calibration sample), train every
    emotion, calibrate its per-token scores and its episode rule on its held-out negatives in the sample
    (Contract 3, ``token_calibration`` and ``episode``, default settings) and write the pair."""
    t0 = time.perf_counter()
    output = Path(output)
    manifest_path = Path(manifest_path) if manifest_path is not None else default_manifest_path(output)
    check_publishable(output, manifest_path)  # before the forward passes, not after
    texts, keys = collect_texts(example_sets)
    sample = calibration_sample(engine.tokenizer, engine.max_tokens, calibration_tokens,
                                holdout=held_out_negatives(example_sets))
    stats = forward_run(engine, cache, texts, keys, RunSamples(sample), progress=progress)
    readout = train_readout(example_sets, cache, list(engine.layers), estimator, skip_invalid=skip_invalid)
    entries, source = calibration_entries(sample, example_sets, readout.concepts)
    tokens = TokenCache(cache.root, engine.fingerprint, engine.loaded.dtype)
    projections = project_calibration(readout, entries, tokens, hidden_layers=engine.layers)
    token_calibration = calibrate_readout(readout, entries, tokens, hidden_layers=engine.layers, source=source,
                                          target_rate=token_target_rate, projections=projections)
    episode = calibrate_episodes(projections, token_calibration, source=source)
    loaded = engine.loaded
    fp = dict(engine.fingerprint)
    training = {
        "estimator": estimator,
        "split": "train",
        "calibration_split": "holdout",
        "max_tokens": fp.get("max_tokens"),
        "texts": stats.texts_total,
        "unique_texts": stats.unique_texts,
        "truncated_texts_this_run": stats.truncated,
        "cache_fingerprint_id": cache.fingerprint_id,
        # lets `amygdala report` find the cached activations again
        "cache_root": str(cache.root.resolve() if isinstance(cache.root, Path) else cache.root),
        "weights_hash": loaded.weights_hash,
        "tool": "amygdala_dagster.train_steering_vectors",
    }
    training.update(training_info or {})
    manifest = write_readout(
        output, manifest_path, readout, vectors_dtype=vectors_dtype, model=loaded.model_id,
        model_revision=loaded.revision, dtype=loaded.dtype, pooling=fp.get("pooling", engine.pooling),
        layer_path=engine.resolved_layer_path, fingerprint=fp, training=training, calibration=readout.calibration,
        token_calibration=token_calibration, episode=episode, keep_releases=current_settings().keep_releases,
    )
    return TrainResult(
        vectors_path=output, manifest_path=manifest_path, manifest=manifest, cache_stats=stats,
        concepts=list(readout.concepts), layers=list(readout.layers), skipped=list(readout.skipped),
        seconds=time.perf_counter() - t0, model_weights_loaded=engine.weights_loaded, cache_dir=str(cache.directory),
        engine=engine_report(engine),
    )


def train_from_examples_dir(
    training_data_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: EngineSettings = EngineSettings(),
    *,
    manifest: str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    estimator: str = DEFAULT_ESTIMATOR,
    emotions: Sequence[str] | None = None,
    vectors_dtype: str = "float32",
    skip_invalid: bool = False,
    progress: bool = True,
) -> TrainResult:
    """The whole of the seed's step 2 as a function (what ``train_steering_vectors`` runs).

    Raises :class:`SettingsError` for options that do not fit the data or model,
    :class:`TrainingError` for refusals (naming the emotions),
    :class:`UnwritableError` before any forward pass when an output cannot be
    written, and lets ``ModelLoadError`` / ``ExamplesFormatError`` through.
    """
    t0 = time.perf_counter()
    if estimator not in ESTIMATORS:
        raise SettingsError(f"--estimator: unknown estimator {estimator!r}; "
                            f"choose one of {', '.join(sorted(ESTIMATORS))}")
    check_writable({"--cache-dir": settings.cache_root()}, {"--output": output, "--manifest": manifest})
    index, sets = read_examples_dir(training_data_dir)
    sets = select_emotions(sets, emotions)
    if not sets:
        raise TrainingError(f"{training_data_dir}: no emotions to train")
    problems = untrainable(sets)
    if problems:
        if not skip_invalid:
            raise TrainingError("; ".join(problems.values()) + " (use --skip-invalid to leave such emotions out)")
        for p in problems.values():
            log.warning("skipping %s", p)
        sets = {k: v for k, v in sets.items() if k not in problems}
        if not sets:
            raise TrainingError("no trainable emotions left: " + "; ".join(problems.values()))
    t_load = time.perf_counter()
    engine = build_engine(settings)
    load_seconds = time.perf_counter() - t_load
    cache = ActivationCache(settings.cache_root(), engine.fingerprint, shard_size=shard_size)
    examples_index = {k: v for k, v in index.items() if k not in ("emotions", "emotion_order")}
    try:
        result = train_readout_pair(
            engine, sets, cache, output, manifest,
            estimator=estimator, vectors_dtype=vectors_dtype, skip_invalid=skip_invalid, progress=progress,
            training_info={
                "training_data_dir": str(Path(training_data_dir).resolve()),
                "examples_index": examples_index,
                "skipped": list(problems.values()) if skip_invalid else [],
            },
        )
    except ValueError as exc:  # DegenerateDirectionError, empty text: name the emotion/key
        raise TrainingError(str(exc)) from exc
    result.skipped = list(problems.values()) + result.skipped
    result.model_load_seconds = load_seconds + engine.stats.load_seconds
    result.seconds = time.perf_counter() - t0
    return result
