"""``amygdala run``: materialise the whole asset graph (every emotion) through Dagster, in one command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from amygdala_dagster.commands.flags import open_fraction, positive_int
from amygdala_dagster.commands.inputs import check_jsonl_input
from amygdala_dagster.engine.checkpoints import ModelLoadError
from amygdala_dagster.engine.token_sample import DEFAULT_SAMPLE_TOKENS
from amygdala_dagster.graph.nodes import MemoryGraphError
from amygdala_dagster.pipeline.definitions import default_resources
from amygdala_dagster.pipeline.instance import InstanceUnavailable
from amygdala_dagster.pipeline.resources import (
    ArtifactStorage,
    EvaluationResource,
    MemoryGraphResource,
    ModelResource,
    SelectionResource,
    ShardingResource,
)
from amygdala_dagster.pipeline.runner import dagster_home, failures, get_instance, materialize_all, step_metadata
from amygdala_dagster.readout.episode import DEFAULT_FALSE_ALARM_RATE
from amygdala_dagster.readout.releases import POINTER_FILE, current_pair
from amygdala_dagster.workflow.engine_settings import fast_path_line
from amygdala_dagster.workflow.layout import EVALUATION_HTML, MANIFEST_FILE, VECTORS_FILE, check_writable
from amygdala_dagster.workflow.settings import MAX_SHARDS, absolute_location, current_settings, flag_type

HELP = "materialise the whole asset graph (snapshot -> vectors, manifest, report); runs show in `dagster dev`"


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``run`` and ``backfill-emotion``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--memory-mcp-url", metavar="URL", default=None,
                     help="memory graph MCP server (default: $AMYGDALA_MEMORY_MCP_URL; token from "
                          "$AMYGDALA_MEMORY_TOKEN)")
    src.add_argument("--memory-file", metavar="GRAPH.jsonl", default=None,
                     help="JSONL export of the memory graph (default: $AMYGDALA_MEMORY_FILE, else the bundled "
                          "sample graph)")
    parser.add_argument("--model", default=None,
                        help="bundled short name, checkpoint dir or hub id (default: $AMYGDALA_MODEL or minilm)")
    parser.add_argument("--target-layers", metavar="L1,L2,...", default=None, type=flag_type("target_layers"),
                        help="hooked layer indices (default: $AMYGDALA_TARGET_LAYERS, else ~60/70/80%% of the "
                             "model's depth)")
    parser.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                        help="default: $AMYGDALA_DTYPE or auto (bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, type=flag_type("device"),
                        help="cpu, cuda, cuda:1, mps or auto (default: $AMYGDALA_DEVICE or auto)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="texts per forward batch (default: as many as the engine's token budget holds)")
    parser.add_argument("--device-map", metavar="auto|JSON", default=None, type=flag_type("device_map"),
                        help='spread one model over the GPUs of this box: "auto" or a JSON {module: device} map '
                             "(default: $AMYGDALA_DEVICE_MAP)")
    parser.add_argument("--shards", type=flag_type("shards"), default=None,
                        help=f"split the forward work into N parallel steps by text hash, 1 to {MAX_SHARDS} (local: "
                             "N processes, the CPU threads split between them; Kubernetes: one GPU pod each); a run "
                             "never uses more shards than it has unique texts. Default: $AMYGDALA_SHARDS or 1")
    parser.add_argument("--cache-dir", default=None,
                        help="activation cache (default: $AMYGDALA_CACHE_DIR or ~/.cache/amygdala/activations)")
    parser.add_argument("--emotions", metavar="E1,E2,...", default=None,
                        help="curated emotions, always included besides the data-driven choice "
                             "(added to $AMYGDALA_EMOTIONS)")
    parser.add_argument("--min-positives", type=int, default=None,
                        help="positives an emotion needs to qualify (default: 10)")
    parser.add_argument("--output-dir", default=None,
                        help="where artifacts go, a directory or fsspec URL (default: $AMYGDALA_OUTPUT_DIR, else "
                             "./amygdala_output)")
    parser.add_argument("--threshold-method", choices=("max_f1", "fixed_fpr"), default="max_f1",
                        help="decision threshold written into manifest.json (default: %(default)s)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate of the fixed_fpr threshold (default: %(default)s)")
    add_runtime_flags(parser)


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Token calibration and conversation evaluation flags (``run``, ``backfill-emotion``)."""
    parser.add_argument("--token-target-rate", type=open_fraction, default=0.01,
                        help="share of calibration tokens the manifest's token threshold fires on "
                             "(default: %(default)s)")
    parser.add_argument("--episode-false-alarm-rate", type=open_fraction, default=DEFAULT_FALSE_ALARM_RATE,
                        metavar="F", help="share of calibration conversations without an emotion on which its episode "
                                          "rule may fire (default: %(default)s)")
    parser.add_argument("--calibration-texts", metavar="FILE.jsonl", default=None,
                        help='runtime-like text to set the token calibration and the episode rules on, one {"text"} '
                             'or {"messages"} per line, optionally labelled with "emotions" (a record labelled with an '
                             "emotion is left out of that emotion's episode rule); default: each emotion's held-out "
                             "negatives")
    parser.add_argument("--calibration-tokens", type=positive_int, default=None, metavar="N",
                        help="token budget of the calibration sample and of the evaluation conversations whose "
                             f"per-token activations are kept (default: {DEFAULT_SAMPLE_TOKENS})")
    parser.add_argument("--eval-conversations", metavar="FILE.jsonl", default=None,
                        help='labelled conversations {"id", "text"|"messages", "emotions"} for the report\'s runtime '
                             'section (default: the bundled snippets; "none" skips it)')


def _split_names(spec: str | None) -> list[str]:
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def build_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The resources of a run: the ``AMYGDALA_*`` defaults (:func:`default_resources`), flags over them where given."""
    resources = default_resources()
    if args.memory_mcp_url or args.memory_file:
        resources["memory"] = MemoryGraphResource(mcp_url=args.memory_mcp_url, file=args.memory_file)
    # Flags override the AMYGDALA_* environment defaults only where given.
    model_flags = {"model": args.model, "layers": args.target_layers, "dtype": args.dtype,
                   "device": args.device, "batch_size": args.batch_size, "cache_dir": args.cache_dir,
                   "device_map": args.device_map}
    resources["model"] = ModelResource(**{
        **{k: getattr(resources["model"], k) for k in ModelResource.model_fields},
        **{k: v for k, v in model_flags.items() if v is not None},
    })
    if args.shards is not None:
        resources["sharding"] = ShardingResource(shards=args.shards)
    if args.output_dir:
        resources["storage"] = ArtifactStorage(base_path=absolute_location(args.output_dir))
    selection = resources["selection"]
    curated = list(dict.fromkeys([*selection.curated, *_split_names(args.emotions), *getattr(args, "names", [])]))
    resources["selection"] = SelectionResource(**{
        **{k: getattr(selection, k) for k in SelectionResource.model_fields},
        "curated": curated,
        **({"min_positives": args.min_positives} if args.min_positives is not None else {}),
    })
    calibration, conversations = check_input_files(args)
    resources["evaluation"] = EvaluationResource(
        threshold_method=args.threshold_method, target_fpr=args.target_fpr,
        token_target_rate=args.token_target_rate, episode_false_alarm_rate=args.episode_false_alarm_rate,
        **({"calibration_tokens": args.calibration_tokens} if args.calibration_tokens is not None else {}),
        calibration_texts=str(calibration.resolve()) if calibration else None,
        eval_conversations=str(conversations.resolve()) if conversations else args.eval_conversations,
    )
    return resources


def check_input_files(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """``--calibration-texts`` and ``--eval-conversations`` read with the reader the run uses, before any work.

    ``InputError`` (a ``ValueError``) names the flag, the file and the line; an
    empty or blank file is refused. The paths, None where not given (or ``none``).
    """
    calibration = getattr(args, "calibration_texts", None)
    conversations = getattr(args, "eval_conversations", None)
    if conversations and conversations.lower() == "none":
        conversations = None
    return (check_jsonl_input("--calibration-texts", calibration) if calibration else None,
            check_jsonl_input("--eval-conversations", conversations, labelled=True) if conversations else None)


def check_outputs(resources: dict[str, Any], args: argparse.Namespace | None = None) -> None:
    """Every place the run writes, checked before the graph is read or a model prepared (one line on failure,
    naming the flag or the variable the location came from)."""
    settings = current_settings()

    def origin(flag: str, field: str) -> str:
        given = getattr(args, field, None) if args is not None else None
        return flag if given or not getattr(settings, field) else f"AMYGDALA_{field.upper()}"

    check_writable({origin("--output-dir", "output_dir"): resources["storage"].base_path,
                    origin("--cache-dir", "cache_dir"): resources["model"].cache_root(),
                    "DAGSTER_HOME": dagster_home()})


@dataclass(frozen=True)
class PublishedPair:
    """The pair an output directory serves: the release ``current`` points at and its manifest's ``created_at``.

    ``release`` is None for a pair of plain files (the layout before releases);
    ``unreadable`` says why the directory could not be read (then nothing is claimed).
    """

    release: str | None = None
    created_at: str | None = None
    unreadable: str | None = None

    def describe(self) -> str:
        when = f"from {self.created_at or 'an unknown time'}"
        return f"{when} (release {self.release})" if self.release else when


def published_pair(store: Any) -> PublishedPair | None:
    """What ``store`` publishes now (see :class:`PublishedPair`); None when it holds no pair."""
    try:
        current = current_pair(store.uri(""))
        manifest = current[1] if current else MANIFEST_FILE
        release = PurePosixPath(current[0]).parent.name if current else None
        if current is None and not store.exists(MANIFEST_FILE):
            return None
        try:
            created_at = json.loads(store.read_bytes(manifest)).get("created_at")
        except ValueError:
            created_at = None
        return PublishedPair(release=release, created_at=created_at if isinstance(created_at, str) else None)
    except (OSError, ValueError) as exc:  # PublishError (a bad pointer) is an OSError
        return PublishedPair(unreadable=str(exc) or type(exc).__name__)


def pair_lines(store: Any, before: PublishedPair | None, after: PublishedPair | None) -> list[str]:
    """What a failed or refused command did to the published pair, from the pair before and after it."""
    names = f"{store.uri(VECTORS_FILE)} and {store.uri(MANIFEST_FILE)}"
    for state in (before, after):
        if state is not None and state.unreadable:
            return [f"cannot tell whether {names} changed ({state.unreadable}); look at {store.uri('')}"]
    if after == before:
        if after is None:
            return ["no vectors or manifest were published"]
        return [f"{names} were NOT updated: they are still the pair {after.describe()}"]
    if after is None:
        return [f"no vectors or manifest are published in {store.uri('')} now"
                + (f" (there were, {before.describe()})" if before else "")]
    return [f"{names} WERE updated before the failure: they are the new pair {after.describe()}"
            + (f", which replaced the pair {before.describe()}" if before else ""),
            "the run failed after publishing them: what the failed steps (above) write is not up to date"]


def report_result(result: Any, resources: dict[str, Any], what: str, pair_before: PublishedPair | None = None) -> int:
    """Print where the outputs went, or each failure's cause once, and what is published now; the exit status.

    ``pair_before``: :func:`published_pair` before the run, compared with the pair after it.
    """
    store = resources["storage"].store()
    stats = step_metadata(result, "activation_stats")
    if stats:
        work = (f"{stats.get('tokens')} tokens ({stats.get('tokens_per_s')} tokens/s) on {stats.get('device')}"
                if stats.get("texts_forwarded") else "no forward pass")
        print(f"activations: {stats.get('texts_forwarded')} texts forwarded, {stats.get('texts_cached')} cached, "
              f"{work}; "
              + fast_path_line({"fast_path": stats.get("fast_path"),
                                "kernels_found": [k for k in str(stats.get("kernels_found") or "").split(", ") if k],
                                "kernels_missing": [k for k in str(stats.get("kernels_missing") or "").split(", ")
                                                    if k]}))
    shards = step_metadata(result, "activation_cache")
    if shards:
        print(f"shards: {shards.get('shards')} steps forwarded {shards.get('forwarded_per_shard')} texts "
              f"(of {shards.get('unique_texts')} unique) in {shards.get('wall_seconds')}s")
    hint = (f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev" if os.environ.get("DAGSTER_HOME")
            else "`dagster dev` from the repository root")
    where = f"dagster run {result.run_id} recorded in {dagster_home()} (see it with {hint})"
    if not result.success:
        problems = failures(result)
        print(f"amygdala {what}: the run failed: {problems[0] if problems else 'see the run'}", file=sys.stderr)
        for p in problems[1:]:
            print(f"  also: {p}", file=sys.stderr)
        print(f"  full log and tracebacks: {where}", file=sys.stderr)
        for line in pair_lines(store, pair_before, published_pair(store)):
            print(f"  {line}", file=sys.stderr)
        return 1
    print(where)
    print(f"output directory: {store.uri('')}")
    for rel in (VECTORS_FILE, MANIFEST_FILE, POINTER_FILE, EVALUATION_HTML):
        if store.exists(rel):
            print(f"  {store.uri(rel)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)


def execute(what: str, args: argparse.Namespace, launch: Any) -> int:
    """Shared by ``run`` and ``backfill-emotion``: resources, checks, the run, the summary."""
    resources: dict[str, Any] | None = None
    started = False
    pair_before: PublishedPair | None = None
    try:
        resources = build_resources(args)
        check_outputs(resources, args)
        pair_before = published_pair(resources["storage"].store())
        started = True
        with get_instance() as instance:
            result = launch(resources, instance)
            return report_result(result, resources, what, pair_before)
    except InstanceUnavailable as exc:  # the instance's database: an outage, not a bad input (exit 1)
        print(f"amygdala {what}: {exc}", file=sys.stderr)
        return 1
    except (MemoryGraphError, ModelLoadError, OSError, ValueError) as exc:
        print(f"amygdala {what}: {exc}", file=sys.stderr)
        if resources is not None:
            store = resources["storage"].store()
            pair = published_pair(store)
            if started and pair != pair_before:  # refused late, after something was published: say so
                for line in pair_lines(store, pair_before, pair):
                    print(f"  {line}", file=sys.stderr)
            elif pair is not None and not pair.unreadable:
                print(f"  nothing was trained; the vectors and manifest in the output directory are "
                      f"{pair.describe()}, not from this run", file=sys.stderr)
        return 2


def main(args: argparse.Namespace) -> int:
    return execute("run", args, materialize_all)
