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

This module is the command line only; the work is
:func:`amygdala_dagster.workflow.training.train_from_examples_dir` (and
:func:`~amygdala_dagster.workflow.training.train_readout_pair` given an engine).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from amygdala_dagster.commands.flags import positive_int
from amygdala_dagster.engine.activations import ActivationOutOfMemoryError
from amygdala_dagster.engine.cache import DEFAULT_SHARD_SIZE
from amygdala_dagster.engine.checkpoints import ModelLoadError
from amygdala_dagster.engine.layers import parse_layers
from amygdala_dagster.engine.placement import parse_device_map
from amygdala_dagster.engine.shard_store import CacheError
from amygdala_dagster.examples.selection import ExamplesFormatError
from amygdala_dagster.files.atomic import atomic_write_text
from amygdala_dagster.graph.tags import check_emotion_name
from amygdala_dagster.readout.estimators import DEFAULT_ESTIMATOR, ESTIMATORS
from amygdala_dagster.readout.releases import PublishError
from amygdala_dagster.workflow.engine_settings import DEFAULT_MODEL, EngineSettings, SettingsError, fast_path_line
from amygdala_dagster.workflow.layout import UnwritableError, check_writable
from amygdala_dagster.workflow.training import TrainingError, TrainResult, train_from_examples_dir

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
VECTORS_DTYPE_CHOICES = ("float32", "float16", "bfloat16")
POOLING_CHOICES = ("mean", "last")

# ----------------------------------------------------------------------------- command line
def _layers_flag(text: str) -> str:
    # Syntax is checked here; ranges once the model's depth is known.
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
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                   help="texts per forward pass (default: as many as the --max-batch-tokens budget holds)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=None, metavar="N",
                   help="cap on padded tokens per batch (default: chosen by the engine from the measurements)")
    p.add_argument("--max-tokens", type=positive_int, default=512, metavar="N",
                   help="truncate texts to this many tokens")
    p.add_argument("--pooling", choices=POOLING_CHOICES, default="mean", help="token pooling (default mean)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--device-map", default=None, metavar="auto|JSON",
                   help='spread one model over several GPUs: "auto" or a JSON {module: device} map (needs accelerate)')
    p.add_argument("--cache-dir", default=None, metavar="DIR|URL",
                   help="activation cache, a directory or fsspec URL such as s3://bucket/cache "
                        "(default $AMYGDALA_CACHE_DIR or ~/.cache/amygdala/activations)")
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
        fast_path_line(result.engine),
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
        hf_logging.disable_progress_bar()  # the "Loading weights" bar
    try:
        device_map = parse_device_map(args.device_map)
    except ValueError as exc:
        parser.error(f"--device-map: {exc}")
    settings = EngineSettings(
        model=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
        layers=args.target_layers, pooling=args.pooling, batch_size=args.batch_size, max_tokens=args.max_tokens,
        max_batch_tokens=args.max_batch_tokens, layer_path=args.layer_path,
        trust_remote_code=args.trust_remote_code, cache_dir=args.cache_dir or None,
        device_map=device_map,
    )
    try:
        # train_from_examples_dir checks the cache, --output and --manifest itself
        check_writable(files={"--json-summary": args.json_summary})
        result = train_from_examples_dir(
            args.training_data_dir, args.output, settings, manifest=args.manifest,
            shard_size=args.cache_shard_size, estimator=args.estimator, emotions=args.emotions,
            vectors_dtype=args.vectors_dtype, skip_invalid=args.skip_invalid, progress=not args.quiet,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    except (TrainingError, ExamplesFormatError, ModelLoadError, CacheError, ActivationOutOfMemoryError,
            UnwritableError, PublishError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(result))
    if args.json_summary is not None:
        atomic_write_text(args.json_summary, json.dumps(result.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
