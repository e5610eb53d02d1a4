"""``amygdala report``: (re)build the evaluation report from the artefacts of an output directory.

Reads ``vectors.safetensors`` + ``manifest.json``, the examples (the pipeline's
``examples/<emotion>/`` directories, or the Contract 2 directory recorded in the
manifest as ``training.training_data_dir``), the memory snapshot when present,
and the activation caches recorded for the readout. Activations come from the
caches; the model is prepared (weights only when something is missing) for
texts or conversations never forwarded, and for a ``--sweep-layers`` pass --
this command, not the evaluation code, does any forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from amygdala_dagster.commands.flags import non_negative_int, unit_fraction
from amygdala_dagster.commands.inputs import check_jsonl_input
from amygdala_dagster.data import conversation_snippets_path
from amygdala_dagster.engine.cache import ActivationCache, cache_location, fingerprint_id, text_sha256
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.inputs import InputError, read_inputs
from amygdala_dagster.engine.layers import parse_layers
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.engine.token_sample import DEFAULT_SAMPLE_TOKENS
from amygdala_dagster.evaluation.conversations import conversations_section
from amygdala_dagster.evaluation.core import calibration_for_manifest, evaluate
from amygdala_dagster.evaluation.generalisation import read_snippets
from amygdala_dagster.evaluation.layer_sweep import sweep_layers
from amygdala_dagster.evaluation.report import summary_markdown, write_report
from amygdala_dagster.evaluation.verdicts import Criteria, apply_verdicts, log_unusable
from amygdala_dagster.examples.catalog import catalog_summary
from amygdala_dagster.examples.directory import read_examples_dir
from amygdala_dagster.examples.selection import ExampleSet
from amygdala_dagster.files.storage import Store, is_local
from amygdala_dagster.graph.snapshot import read_snapshot
from amygdala_dagster.readout.manifest import ReadoutFileError, load_readout
from amygdala_dagster.readout.publish import republish_manifest
from amygdala_dagster.readout.releases import PublishError, open_pair
from amygdala_dagster.workflow.engine_settings import EngineSettings, SettingsError, build_engine
from amygdala_dagster.workflow.layout import (
    CATALOG_FILE,
    MANIFEST_FILE,
    REPORT_DIR,
    SNAPSHOT_FILE,
    STAGED_INFO,
    examples_dir,
)
from amygdala_dagster.workflow.samples import conversation_sample
from amygdala_dagster.workflow.settings import current_settings

HELP = ("rebuild the evaluation report (HTML + evaluation.json) from an output directory's vectors, manifest and "
        "examples")

log = logging.getLogger("amygdala.report")


class ReportInputError(ValueError):
    """An input of the report that is missing or unusable; the message names it."""


def _histograms(value: str) -> int | None:
    """``--histograms``: a count, or ``all`` (None)."""
    return None if value.strip().lower() == "all" else non_negative_int(value)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default=None,
                        help="directory holding the published pair (default: $AMYGDALA_OUTPUT_DIR, else "
                             "./amygdala_output); "
                             "a URL such as s3://bucket/prefix is read and the report written back there")
    parser.add_argument("--manifest", type=Path, default=None, help="default: OUTPUT_DIR/manifest.json")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="default: the manifest's vectors_file, relative to the manifest")
    parser.add_argument("--examples-dir", type=Path, default=None,
                        help="Contract 2 examples directory (default: OUTPUT_DIR/examples/<emotion>/ or the "
                             "manifest's training.training_data_dir)")
    parser.add_argument("--cache-dir", default=None,
                        help="activation cache root, a directory or fsspec URL (default: the one recorded for the "
                             "readout, else $AMYGDALA_CACHE_DIR or ~/.cache/amygdala/activations)")
    parser.add_argument("--snapshot", type=Path, default=None,
                        help="memory snapshot Parquet for tag co-occurrence "
                             "(default: OUTPUT_DIR/snapshot/memory_snapshot.parquet if present)")
    parser.add_argument("--snippets", type=Path, default=None,
                        help="JSONL of {id, text} conversation snippets (default: the bundled sample)")
    parser.add_argument("--no-snippets", action="store_true", help="skip the generalisation section")
    parser.add_argument("--eval-conversations", default=None, metavar="FILE.jsonl",
                        help='labelled conversations {"id", "text"|"messages", "emotions"} for the runtime section '
                             '(default: the bundled snippets unless --no-snippets; "none" skips it)')
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where the report goes (default: OUTPUT_DIR/report)")
    parser.add_argument("--threshold-method", choices=("max_f1", "fixed_fpr"), default="max_f1",
                        help="decision threshold rule (default: %(default)s)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate for fixed_fpr (default: %(default)s)")
    parser.add_argument("--crosstalk-cosine", type=float, default=0.5,
                        help="list vector pairs with cosine at least this (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=200,
                        help="bootstrap resamples for AUROC CIs, 0 = none (default: %(default)s, as in amygdala run, "
                             "so that a rebuilt report shows the run's intervals)")
    parser.add_argument("--confound-margin", type=float, default=Criteria.confound_margin,
                        help="how much a vector's AUROC must beat the trivial baselines (default: %(default)s)")
    parser.add_argument("--estimators", default="auto",
                        help="estimators to compare: auto (mean_difference,lda,logistic up to 24 emotions, else "
                             "mean_difference), none, or a list (default: %(default)s)")
    parser.add_argument("--histograms", type=_histograms, default=12, metavar="N|all",
                        help="draw the projection histogram of this many emotions (a number >= 0 or all), most "
                             "attention first (default: %(default)s)")
    parser.add_argument("--min-auroc", type=float, default=Criteria.min_auroc,
                        help="held-out AUROC a usable vector reaches (default: %(default)s)")
    parser.add_argument("--min-holdout-positives", type=int, default=Criteria.min_holdout_positives,
                        help="fewer held-out positives make the verdict 'weak' (default: %(default)s)")
    parser.add_argument("--min-episode-auroc", type=float, default=Criteria.min_episode_auroc,
                        help="the episode rule's score separating conversations with and without an emotion less "
                             "well (AUROC) makes the verdict 'weak' (default: %(default)s)")
    parser.add_argument("--max-episode-false-alarm-rate", type=unit_fraction,
                        default=Criteria.max_episode_false_alarm_rate, metavar="F",
                        help="the episode rule firing on more conversations without the emotion, beyond "
                             "the 95%% interval, makes the verdict 'weak' (default: the rule's own "
                             "false-alarm rate in the manifest)")
    parser.add_argument("--min-episode-hit-rate", type=unit_fraction, default=Criteria.min_episode_hit_rate,
                        metavar="F",
                        help="the episode rule firing on fewer conversations with the emotion, beyond the 95%% "
                             "interval, makes the verdict 'weak' (default: %(default)s)")
    parser.add_argument("--logistic-c", type=float, default=1.0, help="inverse regularisation of the logistic probe")
    parser.add_argument("--sweep-layers", default=None, metavar="all|L1,L2,...",
                        help="also evaluate these layers (one model pass, separate cache namespace) and recommend "
                             "target layers")
    parser.add_argument("--write-calibration", action="store_true",
                        help="also write the calibration (with thresholds) into manifest.json (vectors unchanged)")
    parser.add_argument("--device", default=None,
                        help="device if the model must be loaded (default: $AMYGDALA_DEVICE or auto; checked only "
                             "when a text must be forwarded)")
    parser.add_argument("--batch-size", type=int, default=16, help="forward batch size if the model must be loaded")


# ----------------------------------------------------------------------------- inputs


def _staged_info(output_dir: Path) -> dict[str, Any]:
    path = output_dir / STAGED_INFO
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("%s: unreadable (%s); ignoring it", path, exc)
    return {}


def resolve_cache_root(args: argparse.Namespace, manifest: dict[str, Any], output_dir: Path) -> Path | str:
    """``--cache-dir``, else the cache root recorded by the pipeline or the manifest, else the default."""
    if args.cache_dir is not None:
        return cache_location(args.cache_dir)
    training = manifest.get("training") or {}
    for candidate in (training.get("cache_root"), _staged_info(output_dir).get("cache_root")):
        if candidate:
            return cache_location(candidate)
    return current_settings().cache_location()


def load_example_sets(args: argparse.Namespace, manifest: dict[str, Any], output_dir: Path,
                      concepts: list[str]) -> dict[str, ExampleSet]:
    """``{concept: ExampleSet}`` for every concept of the readout, from the first source that has them."""
    sets: dict[str, Any] = {}
    candidates = []
    if args.examples_dir is not None:
        candidates.append(args.examples_dir)
    else:
        recorded = (manifest.get("training") or {}).get("training_data_dir")
        if recorded:
            candidates.append(Path(recorded))
    for directory in candidates:
        if not directory.is_dir():
            raise ReportInputError(f"examples directory {directory} does not exist")
        _, found = read_examples_dir(directory)
        sets.update({k: v for k, v in found.items() if k in concepts})
    if args.examples_dir is None:
        for concept in concepts:
            per_emotion = output_dir / examples_dir(concept)
            if concept not in sets and (per_emotion / "index.json").is_file():
                _, found = read_examples_dir(per_emotion)
                if concept in found:
                    sets[concept] = found[concept]
    missing = [c for c in concepts if c not in sets]
    if missing:
        raise ReportInputError(
            f"no training examples found for concept(s) {', '.join(missing)} "
            f"(looked in {', '.join(map(str, candidates)) or '-'} and {output_dir / 'examples'}); pass --examples-dir"
        )
    return sets


class _LazyEngine:
    """Prepares the manifest's model (without its weights) on first use only; the weights are read only
    by a forward pass, so a fully cached report never pays for them."""

    def __init__(self, manifest: dict[str, Any], args: argparse.Namespace):
        try:
            self.settings = EngineSettings.from_manifest(manifest, device=args.device, batch_size=args.batch_size)
        except SettingsError as exc:
            raise ReportInputError(f"{exc}; cannot forward uncached texts") from None
        self._engine: Any = None

    def get(self, layers: list[int] | None = None) -> Any:
        """An engine over ``layers`` (default: the readout's layers) with the manifest's settings."""
        if self._engine is None:
            log.info("preparing %s (its weights load only if texts must be forwarded)", self.settings.model)
            self._engine = build_engine(self.settings)
        if layers is None:
            return self._engine
        return build_engine(replace(self.settings, layers=tuple(layers)), loaded=self._engine.loaded)


def _parse_sweep(spec: str, n_layers: int) -> list[int]:
    if spec.strip().lower() == "all":
        return list(range(n_layers))
    return parse_layers(spec, n_layers)


def _conversations(args: argparse.Namespace, engines: _LazyEngine, cache: ActivationCache, readout: Any,
                   evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The runtime section (per-token evaluation on labelled conversations); None with ``none``.

    The conversations' per-token activations come from the per-token cache (the run kept them); only
    those missing are forwarded, by the manifest's model."""
    spec = getattr(args, "eval_conversations", None)
    if (spec is not None and str(spec).lower() == "none") or (spec is None and args.no_snippets):
        return None
    path = Path(spec) if spec else conversation_snippets_path()
    try:
        records = read_inputs(path, labelled=True)
    except InputError as exc:
        raise ReportInputError(f"--eval-conversations: {exc}") from None
    engine = engines.get()
    if engine.fingerprint_id != cache.fingerprint_id:
        raise ReportInputError("the model prepared now does not reproduce the manifest's activation fingerprint; "
                               "pass --eval-conversations none")
    sample = conversation_sample(engine.tokenizer, engine.max_tokens, records, path.name, DEFAULT_SAMPLE_TOKENS)
    tokens = TokenCache(cache.root, engine.fingerprint, engine.loaded.dtype)
    ensure_cached(engine, cache, [], progress=True, tokens=tokens, sequences=sample.sequences)
    return conversations_section(sample, tokens, readout, list(engine.layers), evaluation)


# ----------------------------------------------------------------------------- main


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``main`` does, returning ``{"html", "json", "plots", "evaluation"}``."""
    output_dir = args.output_dir.expanduser()
    manifest_path = args.manifest or output_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ReportInputError(
            f"{manifest_path}: no manifest; run `amygdala run` (or train) first, or pass --output-dir")
    named = json.loads(manifest_path.read_text(encoding="utf-8")).get("vectors_file", "vectors.safetensors")
    vectors_path = args.vectors or (manifest_path.parent / named)
    readout = load_readout(vectors_path, manifest_path)  # both files of one published release
    manifest = readout.manifest
    fingerprint = manifest.get("fingerprint")
    if not fingerprint:
        raise ReportInputError(f"{manifest_path}: no 'fingerprint' recorded; cannot find the cached activations")
    concepts = list(readout.concepts)
    sets = load_example_sets(args, manifest, output_dir, concepts)

    snapshot = None
    snap_path = args.snapshot or output_dir / SNAPSHOT_FILE
    if snap_path.is_file():
        snapshot = read_snapshot(snap_path)
    elif args.snapshot is not None:
        raise ReportInputError(f"--snapshot {args.snapshot}: no such file")

    snippets = None
    if not args.no_snippets:
        path = args.snippets or conversation_snippets_path()
        if not path.is_file():
            raise ReportInputError(f"--snippets {path}: no such file")
        snippets = read_snippets(path)

    cache_root = resolve_cache_root(args, manifest, output_dir)
    engines = _LazyEngine(manifest, args)
    with ActivationCache(cache_root, fingerprint) as cache:
        texts = [e.text for s in sets.values() for e in (*s.positives, *s.negatives)]
        texts += [s["text"] for s in snippets or []]
        need_model = any(text_sha256(t) not in cache for t in texts)
        if need_model:
            engine = engines.get()
            if fingerprint_id(engine.fingerprint) != cache.fingerprint_id:
                raise ReportInputError(
                    "some texts are not in the activation cache and the model loaded now does not reproduce the "
                    f"manifest's activation fingerprint (cache {cache.directory}); pass --cache-dir, or --no-snippets"
                )
            ensure_cached(engine, cache, texts, progress=True)
        sweep = None
        if args.sweep_layers:
            n_layers = engines.get().loaded.num_layers
            sweep_engine = engines.get(_parse_sweep(args.sweep_layers, n_layers))
            example_texts = [e.text for s in sets.values() for e in (*s.positives, *s.negatives)]
            with ActivationCache(cache_root, sweep_engine.fingerprint) as sweep_cache:
                swept = ensure_cached(sweep_engine, sweep_cache, example_texts, progress=True)
                sweep = sweep_layers(sweep_cache, sets, n_model_layers=n_layers, cache_stats=swept.to_dict())
        evaluation = evaluate(
            cache, sets, readout, snapshot=snapshot, snippets=snippets,
            estimators=args.estimators, threshold_method=args.threshold_method, target_fpr=args.target_fpr,
            crosstalk_cosine=args.crosstalk_cosine, bootstrap=args.bootstrap, logistic_C=args.logistic_c, sweep=sweep,
            criteria=Criteria(min_auroc=args.min_auroc, min_holdout_positives=args.min_holdout_positives,
                              confound_margin=args.confound_margin, min_episode_auroc=args.min_episode_auroc,
                              max_episode_false_alarm_rate=args.max_episode_false_alarm_rate,
                              min_episode_hit_rate=args.min_episode_hit_rate),
            meta={"vectors_sha256": readout.sha256, "manifest": str(manifest_path),
                  "model": manifest.get("model"), "cache_dir": str(cache_root),
                  **({"snippets_file": str(args.snippets or "bundled conversation_snippets.jsonl")}
                     if snippets else {})},
        )
        evaluation["conversations"] = _conversations(args, engines, cache, readout, evaluation)
        catalog_path = output_dir / CATALOG_FILE
        evaluation["catalog"] = (catalog_summary(pl.read_parquet(catalog_path), concepts)
                                 if catalog_path.is_file() else None)
        apply_verdicts(evaluation)
        log_unusable(evaluation)
    html_path, json_path, plots = write_report(evaluation, args.report_dir or output_dir / REPORT_DIR,
                                               histograms=args.histograms)
    if args.write_calibration:
        cal = calibration_for_manifest(evaluation)
        for concept, per_layer in cal.items():
            for layer, entry in per_layer.items():
                manifest["per_concept"][concept]["layers"][layer]["calibration"] = entry
        text = json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        republish_manifest(vectors_path, manifest_path, text.encode("utf-8"),  # a new release, same vectors
                           keep=current_settings().keep_releases)
    return {"html": html_path, "json": json_path, "plots": plots, "evaluation": evaluation}


REMOTE_INPUTS = ("examples", "snapshot/memory_snapshot.parquet", "readout/staged_vectors.json", CATALOG_FILE)


@contextlib.contextmanager
def local_output_dir(spec: str | Path, write_back: bool) -> Iterator[tuple[Path, str]]:
    """The output directory as a local path, and how to name it to the user.

    A remote one (``s3://...``) is mirrored into a temporary directory: the
    published pair (through its pointer) and the report's inputs; on success
    the report directory is uploaded back and, with ``write_back``, the
    manifest republished there as a new release.
    """

    if is_local(str(spec)):
        yield Path(spec).expanduser(), str(spec)
        return
    store = Store(str(spec))
    with tempfile.TemporaryDirectory(prefix="amygdala-report-") as tmp:
        local = Path(tmp)
        with open_pair(store.uri("")) as files:
            shutil.copyfile(files.vectors, local / "vectors.safetensors")
            shutil.copyfile(files.manifest, local / "manifest.json")
        for rel in REMOTE_INPUTS:
            if store.exists(rel):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                with store.local_for_read(rel) as src:
                    if src.is_dir():
                        shutil.copytree(src, local / rel)
                    else:
                        shutil.copyfile(src, local / rel)
        yield local, store.uri("")
        if (local / "report").is_dir():
            with store.local_for_write("report") as target:
                shutil.copytree(local / "report", target)
        if write_back:
            republish_manifest(store.uri(""), None, (local / "manifest.json").read_bytes(),
                               keep=current_settings().keep_releases)


def check_inputs(args: argparse.Namespace) -> None:
    """``--eval-conversations`` read with the reader the report uses, before anything is read or written
    (``InputError`` naming the flag, the file and the line)."""
    spec = getattr(args, "eval_conversations", None)
    if spec and str(spec).lower() != "none":
        check_jsonl_input("--eval-conversations", spec, labelled=True)


def main(args: argparse.Namespace) -> int:
    settings = current_settings()
    args.output_dir = args.output_dir or settings.output_location()
    args.device = args.device or settings.device
    try:
        check_inputs(args)
        with local_output_dir(args.output_dir, args.write_calibration) as (local, shown):
            out = build_report(argparse.Namespace(**{**vars(args), "output_dir": local}))
            html, numbers = (out["html"], out["json"]) if args.report_dir else (
                f"{shown}/report/{Path(out['html']).name}", f"{shown}/report/{Path(out['json']).name}")
    except (ReportInputError, ReadoutFileError, PublishError, KeyError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"amygdala report: {msg}", file=sys.stderr)
        return 2
    print(summary_markdown(out["evaluation"]), end="")
    print(f"report: {html}")
    print(f"numbers: {numbers}")
    return 0
