"""``amygdala run``: materialise the whole asset graph (every emotion) through Dagster, in one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = "materialise the whole asset graph (snapshot -> vectors, manifest, report); runs show in `dagster dev`"


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``run`` and ``backfill-emotion``."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--memory-mcp-url", metavar="URL", default=None,
                     help="memory graph MCP server (token from $AMYGDALA_MEMORY_TOKEN)")
    src.add_argument("--memory-file", metavar="GRAPH.jsonl", default=None,
                     help="JSONL export of the memory graph (default: the bundled sample graph)")
    parser.add_argument("--model", default=None,
                        help="bundled short name, checkpoint dir or hub id (default: $AMYGDALA_MODEL or minilm)")
    parser.add_argument("--target-layers", metavar="L1,L2,...", default=None,
                        help="hooked layer indices (default: ~60/70/80%% of the model's depth)")
    parser.add_argument("--dtype", default=None, choices=("auto", "bf16", "fp16", "fp32"),
                        help="default: $AMYGDALA_DTYPE or auto (bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps or auto (default: $AMYGDALA_DEVICE or auto)")
    parser.add_argument("--batch-size", type=int, default=None, help="texts per forward batch (default: 16)")
    parser.add_argument("--cache-dir", default=None, help="activation cache (default: $AMYGDALA_CACHE_DIR or ~/.cache/amygdala/activations)")
    parser.add_argument("--emotions", metavar="E1,E2,...", default=None,
                        help="curated emotions, always included besides the data-driven choice "
                             "(added to $AMYGDALA_EMOTIONS)")
    parser.add_argument("--min-positives", type=int, default=None,
                        help="positives an emotion needs to qualify (default: 10)")
    parser.add_argument("--output-dir", default=None,
                        help="where artifacts go, a directory or fsspec URL (default: ./amygdala_output)")
    parser.add_argument("--threshold-method", choices=("max_f1", "fixed_fpr"), default="max_f1",
                        help="decision threshold written into manifest.json (default: %(default)s)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate of the fixed_fpr threshold (default: %(default)s)")


def _split_names(spec: str | None) -> list[str]:
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def build_resources(args: argparse.Namespace) -> dict[str, Any]:
    from amygdala_dagster.pipeline.definitions import default_resources
    from amygdala_dagster.pipeline.resources import (
        ArtifactStorage, EvaluationResource, MemoryGraphResource, ModelResource, SelectionResource,
    )

    resources = default_resources()
    if args.memory_mcp_url or args.memory_file:
        resources["memory"] = MemoryGraphResource(mcp_url=args.memory_mcp_url, file=args.memory_file)
    # Flags override the AMYGDALA_* environment defaults only where given.
    model_flags = {"model": args.model, "layers": args.target_layers, "dtype": args.dtype,
                   "device": args.device, "batch_size": args.batch_size, "cache_dir": args.cache_dir}
    resources["model"] = ModelResource(**{
        **{k: getattr(resources["model"], k) for k in ModelResource.model_fields},
        **{k: v for k, v in model_flags.items() if v is not None},
    })
    out = args.output_dir or str(Path.cwd() / "amygdala_output")
    if "://" not in out:
        out = str(Path(out).expanduser().resolve())
    resources["storage"] = ArtifactStorage(base_path=out)
    selection = resources["selection"]
    curated = list(dict.fromkeys([*selection.curated, *_split_names(args.emotions), *getattr(args, "names", [])]))
    resources["selection"] = SelectionResource(**{
        **{k: getattr(selection, k) for k in SelectionResource.model_fields},
        "curated": curated,
        **({"min_positives": args.min_positives} if args.min_positives is not None else {}),
    })
    resources["evaluation"] = EvaluationResource(threshold_method=args.threshold_method, target_fpr=args.target_fpr)
    return resources


def report_result(result: Any, resources: dict[str, Any], what: str) -> int:
    from amygdala_dagster.pipeline.assets.common import MANIFEST_FILE, REPORT_DIR, VECTORS_FILE
    from amygdala_dagster.pipeline.runner import dagster_home, failures, step_metadata
    from amygdala_dagster.publish import POINTER_FILE

    store = resources["storage"].store()
    stats = step_metadata(result, "activation_stats")
    if stats:
        print(f"activations: {stats.get('texts_forwarded')} texts forwarded, {stats.get('texts_cached')} cached, "
              f"{stats.get('tokens')} tokens ({stats.get('tokens_per_s')} tokens/s) on {stats.get('device')}")
    problems = failures(result)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    import os

    hint = (f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} dagster dev" if os.environ.get("DAGSTER_HOME")
            else "`dagster dev` from the repository root")
    print(f"dagster run {result.run_id} recorded in {dagster_home()} (see it with {hint})")
    if not result.success:
        print(f"amygdala {what}: the run failed", file=sys.stderr)
        return 1
    print(f"output directory: {store.uri('')}")
    for rel in (VECTORS_FILE, MANIFEST_FILE, POINTER_FILE, f"{REPORT_DIR}/evaluation.html"):
        if store.exists(rel):
            print(f"  {store.uri(rel)}")
    return 0


def configure(parser: argparse.ArgumentParser) -> None:
    add_common_flags(parser)


def main(args: argparse.Namespace) -> int:
    from amygdala_dagster.pipeline.runner import get_instance, materialize_all
    from amygdala_dagster.sources import MemoryGraphError

    try:
        resources = build_resources(args)
        with get_instance() as instance:
            result = materialize_all(resources, instance)
            return report_result(result, resources, "run")
    except (MemoryGraphError, ValueError, FileNotFoundError) as exc:
        print(f"amygdala run: {exc}", file=sys.stderr)
        return 2
