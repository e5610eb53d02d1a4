"""Step 2 of the seed design: training examples directory -> readout vectors + manifest.

For each emotion the target model is run over the positive and negative
examples, pooled residual-stream activations are captured at the target
layers, and ``mean(positive) - mean(negative)`` (train split) is stored per
layer, unit-normalised, in ``vectors.safetensors`` (Contract 3) next to its
``manifest.json``. Every distinct text is forwarded at most once per model
fingerprint: pooled activations live in a content-addressed cache
(``--cache-dir``), so a repeated run, or one that adds an emotion whose texts
were already seen, forwards only never-seen texts, and a run that was killed
resumes from what it had cached. The model's weights are read only when some
text has to be forwarded: a repeated run on cached texts loads none.

    python -m amygdala_dagster.train_steering_vectors \\
        --model Qwen/Qwen3.5-27B --training-data-dir /tmp/amygdala_training_data \\
        --target-layers 3,18,33,36 --output /path/to/amygdala_vectors.safetensors \\
        --dtype bf16 --batch-size 4

The library entry point is :func:`train_from_examples_dir`; :func:`train_readout_pair`
does the work given an already loaded engine (the Dagster layer reuses both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amygdala_dagster.atomic import atomic_write_text
from amygdala_dagster.cache import DEFAULT_SHARD_SIZE, ActivationCache, CacheRunStats, default_cache_dir, ensure_cached
from amygdala_dagster.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from amygdala_dagster.flags import positive_int
from amygdala_dagster.tags import check_emotion_name

log = logging.getLogger("amygdala_dagster.train_steering_vectors")

DEFAULT_MODEL = "minilm"
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
VECTORS_DTYPE_CHOICES = ("float32", "float16", "bfloat16")
POOLING_CHOICES = ("mean", "last")
# Fractions of depth for the default target layers: middle-to-late (the seed's ~60-80%).
DEFAULT_DEPTH_FRACTIONS = (0.6, 0.7, 0.8)


def default_target_layers(num_layers: int, fractions: Sequence[float] = DEFAULT_DEPTH_FRACTIONS) -> list[int]:
    """Middle-to-late layers: for each fraction f, the layer after which f of the depth is done.

    Layer ``idx`` is the residual stream after block ``idx + 1`` of ``num_layers``,
    so ``idx = round(f * num_layers) - 1`` (clamped, deduplicated). For 64 layers:
    37, 44, 50; for MiniLM's 6: 3, 4.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    out = {min(num_layers - 1, max(0, round(f * num_layers) - 1)) for f in fractions}
    return sorted(out)


class TrainingError(RuntimeError):
    """Training cannot proceed; the message names the emotion/flag/file."""


class FlagError(ValueError):
    """A flag value that is invalid for this model or data (exit status 2)."""


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
            "seconds": round(self.seconds, 3),
        }


def collect_texts(example_sets: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Every example text of every emotion (both splits, duplicates kept) and a key naming each."""
    texts: list[str] = []
    keys: list[str] = []
    for name, s in example_sets.items():
        for polarity, items in (("positive", s.positives), ("negative", s.negatives)):
            for ex in items:
                texts.append(ex.text)
                keys.append(f"{ex.key} ({name} {polarity})")
    return texts, keys


def untrainable(example_sets: Mapping[str, Any]) -> list[str]:
    """Reasons, naming the emotion, why emotions cannot be trained (empty when all can)."""
    problems = []
    for name, s in example_sets.items():
        pos = sum(1 for e in s.positives if e.split == "train")
        neg = sum(1 for e in s.negatives if e.split == "train")
        if pos == 0 or neg == 0:
            what = " and ".join(w for w, n in (("positive", pos), ("negative", neg)) if n == 0)
            problems.append(f"emotion {name!r}: no {what} examples in the train split "
                            f"({pos} positives, {neg} negatives)")
    return problems


def select_emotions(example_sets: Mapping[str, Any], emotions: Sequence[str] | None) -> dict[str, Any]:
    if not emotions:
        return dict(example_sets)
    unknown = [e for e in emotions if e not in example_sets]
    if unknown:
        raise FlagError(
            f"--emotions: {', '.join(map(repr, unknown))} not in the training data "
            f"(it has {', '.join(sorted(example_sets)) or 'no emotions'})"
        )
    return {e: example_sets[e] for e in dict.fromkeys(emotions)}


def train_readout_pair(
    engine: Any,
    loaded: Any,
    example_sets: Mapping[str, Any],
    cache: ActivationCache,
    output: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str] | None = None,
    *,
    estimator: str = DEFAULT_ESTIMATOR,
    vectors_dtype: str = "float32",
    skip_invalid: bool = False,
    progress: bool = True,
    training_info: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Cache activations for all example texts, train every emotion, write the Contract 3 pair."""
    from amygdala_dagster.manifest import default_manifest_path, write_readout
    from amygdala_dagster.vectors import train_readout

    t0 = time.perf_counter()
    output = Path(output)
    manifest_path = Path(manifest_path) if manifest_path is not None else default_manifest_path(output)
    texts, keys = collect_texts(example_sets)
    stats = ensure_cached(engine, cache, texts, keys=keys, progress=progress)
    layers = list(engine.layers) if hasattr(engine, "layers") else cache.layers
    readout = train_readout(example_sets, cache, layers, estimator, skip_invalid=skip_invalid)
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
        "cache_root": str(cache.root.resolve()),  # lets `amygdala report` find the cached activations again
        "weights_hash": getattr(loaded, "weights_hash", None),
        "tool": "amygdala_dagster.train_steering_vectors",
    }
    training.update(training_info or {})
    manifest = write_readout(
        output,
        manifest_path,
        readout,
        vectors_dtype=vectors_dtype,
        model=loaded.model_id,
        model_revision=loaded.revision,
        dtype=loaded.dtype,
        pooling=fp.get("pooling", getattr(engine, "pooling", None)),
        layer_path=getattr(engine, "resolved_layer_path", None),
        fingerprint=fp,
        training=training,
        calibration=readout.calibration,
    )
    return TrainResult(
        vectors_path=output,
        manifest_path=manifest_path,
        manifest=manifest,
        cache_stats=stats,
        concepts=list(readout.concepts),
        layers=list(readout.layers),
        skipped=list(readout.skipped),
        seconds=time.perf_counter() - t0,
        model_weights_loaded=bool(getattr(engine, "weights_loaded", True)),
        cache_dir=str(cache.directory),
    )


def train_from_examples_dir(
    training_data_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    model: str = DEFAULT_MODEL,
    manifest: str | os.PathLike[str] | None = None,
    target_layers: str | Sequence[int] | None = None,
    dtype: str = "auto",
    batch_size: int = 4,
    pooling: str = "mean",
    max_tokens: int = 512,
    max_batch_tokens: int = 16384,
    device: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    estimator: str = DEFAULT_ESTIMATOR,
    layer_path: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    emotions: Sequence[str] | None = None,
    vectors_dtype: str = "float32",
    skip_invalid: bool = False,
    progress: bool = True,
) -> TrainResult:
    """The whole of step 2 as a function (what the command line runs).

    Raises :class:`FlagError` for options that do not fit the data or model,
    :class:`TrainingError` for refusals (naming the emotions), and lets
    ``ModelLoadError`` / ``ExamplesFormatError`` through.
    """
    from amygdala_dagster.activations import ActivationEngine
    from amygdala_dagster.examples import read_examples_dir
    from amygdala_dagster.layers import check_layer_indices, parse_layers
    from amygdala_dagster.models import load_model

    t0 = time.perf_counter()
    if estimator not in ESTIMATORS:
        raise FlagError(f"--estimator: unknown estimator {estimator!r}; choose one of {', '.join(sorted(ESTIMATORS))}")
    index, sets = read_examples_dir(training_data_dir)
    sets = select_emotions(sets, emotions)
    if not sets:
        raise TrainingError(f"{training_data_dir}: no emotions to train")
    problems = untrainable(sets)
    if problems:
        if not skip_invalid:
            raise TrainingError("; ".join(problems) + " (use --skip-invalid to leave such emotions out)")
        for p in problems:
            log.warning("skipping %s", p)
        bad = {p.split("'")[1] for p in problems}
        sets = {k: v for k, v in sets.items() if k not in bad}
        if not sets:
            raise TrainingError("no trainable emotions left: " + "; ".join(problems))

    t_load = time.perf_counter()
    try:
        # Without the weights: they are read by the first forward pass, if any text is not cached.
        loaded = load_model(model, dtype=dtype, device=device, revision=revision,
                            trust_remote_code=trust_remote_code, weights=False)
    except ValueError as exc:  # device or dtype not usable here (ModelLoadError is not a ValueError)
        raise FlagError(str(exc)) from None
    load_seconds = time.perf_counter() - t_load
    try:
        if target_layers is None:
            layers = default_target_layers(loaded.num_layers)
        elif isinstance(target_layers, str):
            layers = parse_layers(target_layers, loaded.num_layers)
        else:
            layers = list(target_layers)
        layers = check_layer_indices(layers, loaded.num_layers, loaded.model_id)
    except ValueError as exc:
        raise FlagError(f"--target-layers: {exc}") from None
    try:
        engine = ActivationEngine(
            loaded, layers, pooling=pooling, max_tokens=max_tokens, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, layer_path=layer_path,
        )
    except ValueError as exc:  # e.g. --layer-path that does not resolve, --pooling
        raise FlagError(str(exc)) from None
    cache = ActivationCache(cache_dir if cache_dir is not None else default_cache_dir(), engine.fingerprint,
                            shard_size=shard_size)
    examples_index = {k: v for k, v in index.items() if k not in ("emotions", "emotion_order")}
    try:
        result = train_readout_pair(
            engine, loaded, sets, cache, output, manifest,
            estimator=estimator, vectors_dtype=vectors_dtype, skip_invalid=skip_invalid, progress=progress,
            training_info={
                "training_data_dir": str(Path(training_data_dir).resolve()),
                "examples_index": examples_index,
                "skipped": problems if skip_invalid else [],
            },
        )
    except ValueError as exc:  # DegenerateDirectionError, empty text: name the emotion/key
        raise TrainingError(str(exc)) from exc
    result.skipped = problems + result.skipped
    result.model_load_seconds = load_seconds + engine.stats.load_seconds
    result.model_weights_loaded = engine.weights_loaded
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- command line
def _layers_flag(text: str) -> str:
    # Syntax is checked here; ranges once the model's depth is known.
    from amygdala_dagster.layers import parse_layers

    try:
        parse_layers(text, 10**9)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _emotions_flag(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"emotion list {text!r} has an empty entry")
    try:
        return [check_emotion_name(n) for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m amygdala_dagster.train_steering_vectors",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|PATH",
                   help="model: a hub id, a local checkpoint directory, or 'minilm' (bundled; default)")
    p.add_argument("--training-data-dir", required=True, type=Path, metavar="DIR",
                   help="directory written by extract_training_pairs")
    p.add_argument("--target-layers", type=_layers_flag, default=None, metavar="LIST",
                   help="comma-separated 0-based layer indices (negative = from the end); default: "
                        "middle-to-late layers at 60%%, 70%% and 80%% of the depth")
    p.add_argument("--output", required=True, type=Path, metavar="FILE",
                   help="vectors file to write (safetensors, Contract 3)")
    p.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="manifest to write (default: manifest.json next to --output)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="texts per forward pass")
    p.add_argument("--max-batch-tokens", type=positive_int, default=16384, metavar="N",
                   help="cap on padded tokens per batch")
    p.add_argument("--max-tokens", type=positive_int, default=512, metavar="N",
                   help="truncate texts to this many tokens")
    p.add_argument("--pooling", choices=POOLING_CHOICES, default="mean", help="token pooling (default mean)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="activation cache (default $AMYGDALA_CACHE_DIR or ~/.cache/amygdala/activations)")
    p.add_argument("--cache-shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help="texts per cache shard (a killed run resumes from complete shards)")
    p.add_argument("--estimator", default=DEFAULT_ESTIMATOR,
                   help=f"direction estimator (default {DEFAULT_ESTIMATOR})")
    p.add_argument("--layer-path", default=None, metavar="DOTTED",
                   help="module path of the decoder layer list when it cannot be found automatically")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running code shipped with the checkpoint (off by default)")
    p.add_argument("--emotions", type=_emotions_flag, default=None, metavar="LIST",
                   help="comma-separated subset of the emotions in --training-data-dir")
    p.add_argument("--vectors-dtype", choices=VECTORS_DTYPE_CHOICES, default="float32",
                   help="dtype of the stored vectors (default float32)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out emotions that cannot be trained instead of refusing the run")
    p.add_argument("--json-summary", type=Path, default=None, metavar="FILE",
                   help="also write the run summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def format_summary(result: TrainResult) -> str:
    s = result.cache_stats
    lines = [
        f"texts: {s.texts_total} ({s.unique_texts} unique): {s.forwarded} forwarded, {s.cached} from the cache",
        f"tokens: {s.tokens} forwarded ({s.truncated} truncated to --max-tokens) in {s.seconds:.1f}s"
        + (f" ({s.tokens_per_s:,.0f} tokens/s)" if s.forwarded else "")
        + (f" on {s.device}" if s.device else ""),
        f"concepts: {len(result.concepts)} ({', '.join(result.concepts)})",
        f"layers: {', '.join(map(str, result.layers))}",
    ]
    if result.skipped:
        lines.append(f"skipped: {'; '.join(result.skipped)}")
    lines += [
        f"vectors: {result.vectors_path}",
        f"manifest: {result.manifest_path}",
        f"model weights loaded: {'yes' if result.model_weights_loaded else 'no (every text was cached)'}",
        f"total: {result.seconds:.1f}s (model load {result.model_load_seconds:.1f}s)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.estimator not in ESTIMATORS:
        parser.error(f"--estimator: unknown estimator {args.estimator!r}; choose one of "
                     f"{', '.join(sorted(ESTIMATORS))}")
    if args.output.is_dir():
        parser.error(f"--output: {args.output} is a directory; give the vectors file path")
    if args.manifest is not None and args.manifest.is_dir():
        parser.error(f"--manifest: {args.manifest} is a directory; give the manifest file path")
    if not args.training_data_dir.is_dir():
        parser.error(f"--training-data-dir: {args.training_data_dir} is not a directory")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the "Loading weights" bar

    from amygdala_dagster.activations import ActivationOutOfMemoryError
    from amygdala_dagster.cache import CacheError
    from amygdala_dagster.examples import ExamplesFormatError
    from amygdala_dagster.models import ModelLoadError

    try:
        result = train_from_examples_dir(
            args.training_data_dir, args.output,
            model=args.model, manifest=args.manifest, target_layers=args.target_layers, dtype=args.dtype,
            batch_size=args.batch_size, pooling=args.pooling, max_tokens=args.max_tokens,
            max_batch_tokens=args.max_batch_tokens, device=args.device, cache_dir=args.cache_dir,
            shard_size=args.cache_shard_size, estimator=args.estimator, layer_path=args.layer_path,
            revision=args.revision, trust_remote_code=args.trust_remote_code, emotions=args.emotions,
            vectors_dtype=args.vectors_dtype, skip_invalid=args.skip_invalid, progress=not args.quiet,
        )
    except FlagError as exc:
        parser.error(str(exc))
    except (TrainingError, ExamplesFormatError, ModelLoadError, CacheError, ActivationOutOfMemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    if args.json_summary is not None:
        atomic_write_text(args.json_summary, json.dumps(result.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
