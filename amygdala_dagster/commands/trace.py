"""``amygdala trace``: the per-token readout of every concept over conversations or text, as the runtime computes it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from amygdala_dagster.commands.flags import positive_int
from amygdala_dagster.engine.cache import is_url
from amygdala_dagster.engine.checkpoints import ModelLoadError
from amygdala_dagster.engine.inputs import InputRecord, read_inputs
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.evaluation.trace import build_trace, render_trace_html
from amygdala_dagster.files.atomic import atomic_write_text
from amygdala_dagster.readout.manifest import ReadoutFileError, load_readout
from amygdala_dagster.readout.runtime import ReadoutRuntime
from amygdala_dagster.workflow.settings import current_settings, flag_type

HELP = ("run the model over conversations or text and show, per token, the calibrated readout of every concept "
        "and its episode rule (DIR/trace.html with a token heatmap and per-concept traces, DIR/trace.json)")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", default=None,
                        help="manifest.json of the readout, or an output directory / fsspec URL (s3://bucket/out) "
                             "holding the published pair (default: $AMYGDALA_OUTPUT_DIR, else ./amygdala_output)")
    parser.add_argument("--vectors", type=Path, default=None,
                        help="vectors.safetensors (default: the manifest's vectors_file, relative to the manifest)")
    parser.add_argument("--model", default=None, help="model to run (default: the manifest's model)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, metavar="FILE.jsonl",
                     help='one {"text": ...} or {"messages": [{"role", "content"}, ...]} per line (optional "id")')
    src.add_argument("--text", help="one text to trace")
    parser.add_argument("--output-dir", type=Path, required=True, help="where trace.html and trace.json go")
    parser.add_argument("--concepts", default=None, metavar="A,B", help="concepts to show (default: top-k per input)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="concepts shown per input (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=None, help="hooked layer to show (default: the manifest's last)")
    parser.add_argument("--device", default=None, type=flag_type("device"),
                        help="cpu, cuda, mps or auto (default: $AMYGDALA_DEVICE or auto)")
    parser.add_argument("--dtype", default=None, help="default: the manifest's dtype")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="inputs per forward batch (default: %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")


def run_trace(args: argparse.Namespace) -> dict:
    """Everything ``main`` does; returns ``{"html", "json", "trace"}`` paths and content."""
    settings = current_settings()
    args.manifest = args.manifest or settings.output_location()
    args.device = args.device or settings.device
    where = str(args.manifest)
    if is_url(where) or Path(where).is_dir():
        # An output directory or bucket prefix: the published pair, read through its release pointer.
        base = where.rsplit("/", 1)[0] if where.endswith(".json") else where
        readout = load_readout(args.vectors or base)
    elif not Path(where).is_file():
        raise ReadoutFileError(f"--manifest {where}: no such file")
    else:
        local = json.loads(Path(where).read_text(encoding="utf-8"))
        readout = load_readout(args.vectors or Path(where).parent / local.get("vectors_file", "vectors.safetensors"),
                               where)
    manifest = readout.manifest
    layer = args.layer if args.layer is not None else int(readout.layers[-1])
    if layer not in readout.layers:
        raise ValueError(f"--layer {layer}: the readout hooks layers {readout.layers}")
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()] if args.concepts else None
    unknown = [c for c in concepts or [] if c not in readout.concepts]
    if unknown:
        raise ValueError(f"--concepts: unknown {', '.join(unknown)}; the manifest has {_names(readout.concepts, 20)}")
    records = read_inputs(args.input) if args.input else [InputRecord("text", args.text)]
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty")
    model = args.model or manifest.get("model")
    if not model:
        raise ValueError("the manifest records no model: pass --model")
    fp = manifest.get("fingerprint") or {}
    loaded = load_model(model, dtype=args.dtype or manifest.get("dtype") or "auto", device=args.device,
                        revision=manifest.get("model_revision") if not args.model else None,
                        trust_remote_code=args.trust_remote_code)
    if loaded.hidden_size != readout.hidden_size:
        raise ValueError(f"model {model} has hidden size {loaded.hidden_size}, the vectors {readout.hidden_size}")
    runtime = ReadoutRuntime.from_loaded(loaded, readout, layer_path=fp.get("layer_path") if not args.model else None,
                                         max_tokens=int(fp.get("max_tokens", 512)), batch_size=args.batch_size)
    with tqdm(total=len(records), desc="trace", unit="input", disable=len(records) < 2, file=sys.stderr) as bar:
        scores = runtime.score_many([r.item for r in records], ids=[r.id for r in records],
                                    progress=lambda n: bar.update(n - bar.n))
    trace = build_trace(scores, layer, readout.manifest, top_k=args.top_k, concepts=concepts,
                        meta={"model": loaded.model_id, "manifest": str(args.manifest),
                              "vectors_sha256": readout.sha256})
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = args.output_dir / "trace.json", args.output_dir / "trace.html"
    atomic_write_text(json_path, json.dumps(trace, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write_text(html_path, render_trace_html(trace))
    return {"html": html_path, "json": json_path, "trace": trace}


_LISTED_INPUTS = 20  # per-input summary lines on stdout; the page shows every input


def _names(names: list[str], n: int = 12) -> str:
    """At most ``n`` names, then how many more (a 200-concept readout would print a wall of text)."""
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


def main(args: argparse.Namespace) -> int:
    try:
        out = run_trace(args)
    except (ReadoutFileError, ModelLoadError, ValueError) as exc:
        print(f"amygdala trace: {exc}", file=sys.stderr)
        return 2
    convs = out["trace"]["conversations"]
    for conv in convs[:_LISTED_INPUTS]:
        cut = conv.get("truncated")
        shown = (f"{cut['tokens_kept']} of {cut['tokens_total']} tokens (cut)" if cut
                 else f"{len(conv['tokens'])} tokens")
        episode = (f"; episode rule fired: {_names(conv['episode_fired']) or 'none'}"
                   if conv.get("episode_z") is not None else "")
        print(f"{conv['id']}: {shown}; fired: {_names(conv['fired']) or 'none'}{episode}")
    if len(convs) > _LISTED_INPUTS:
        print(f"... {len(convs) - _LISTED_INPUTS} more inputs (all of them on the page)")
    cut = [c["truncated"] for c in convs if c.get("truncated")]
    if cut:
        print(f"amygdala trace: {len(cut)} of {len(convs)} input(s) cut to the readout's max_tokens "
              f"({max(c['tokens_kept'] for c in cut)} tokens); the rest of them is not traced "
              f"(longest: {max(c['tokens_total'] for c in cut)} tokens)", file=sys.stderr)
    print(f"trace: {out['html']}")
    print(f"numbers: {out['json']}")
    return 0
