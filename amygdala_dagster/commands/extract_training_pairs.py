"""Memory graph -> training examples directory (Contract 2), the seed design's step 1.

    python -m amygdala_dagster.extract_training_pairs \\
        --memory-mcp-url http://localhost:7777 --output-dir /tmp/amygdala_training_data

Reads every node of the memory graph (an MCP server, or a JSONL export with
``--memory-file``), parses the trailing tag lines, chooses the emotions to cover
(the most-tagged ones with enough positives, plus any named with ``--emotions``)
and writes ``OUTPUT_DIR/<emotion>/{positive,negative}.jsonl`` and
``OUTPUT_DIR/index.json``. The directory is replaced whole, never half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from amygdala_dagster.commands.flags import fraction, non_negative_int, positive_int, score
from amygdala_dagster.examples.directory import run_extraction
from amygdala_dagster.examples.selection import ExamplesFormatError, SelectionParams
from amygdala_dagster.graph.nodes import MemoryGraphError
from amygdala_dagster.graph.sources import open_source
from amygdala_dagster.graph.tags import check_emotion_name

log = logging.getLogger("amygdala_dagster.extract_training_pairs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m amygdala_dagster.extract_training_pairs",
        description=__doc__.split("\n\n")[0],
    )
    src = p.add_argument_group("memory graph (one of; default: the MCP server at http://localhost:7777)")
    src.add_argument("--memory-mcp-url", metavar="URL",
                     help="MCP server of the memory graph (a URL without a path means /mcp); "
                          "a bearer token is read from $AMYGDALA_MEMORY_TOKEN if set")
    src.add_argument("--memory-file", metavar="JSONL", type=Path,
                     help="offline source: a JSONL export, one node object per line")
    p.add_argument("--output-dir", required=True, type=Path, metavar="DIR",
                   help="examples directory to write (replaced whole)")
    p.add_argument("--min-positive-score", type=score, default=8.0, metavar="S",
                   help="a node is a positive for an emotion scored >= S (default 8)")
    p.add_argument("--max-negative-mentions", type=non_negative_int, default=0, metavar="N",
                   help="a tagged node is a negative if it mentions the emotion (tag or whole word) "
                        "at most N times (default 0)")
    p.add_argument("--min-content-chars", type=non_negative_int, default=40, metavar="N",
                   help="ignore nodes whose text (without tags) is shorter (default 40)")
    p.add_argument("--max-examples-per-emotion", type=positive_int, default=500, metavar="N",
                   help="at most N positives and N negatives per emotion (default 500)")
    p.add_argument("--holdout-fraction", type=fraction, default=0.2, metavar="F",
                   help="fraction of nodes held out for evaluation, decided per node key (default 0.2)")
    p.add_argument("--emotions", metavar="LIST|@FILE",
                   help="emotions always included besides the data-driven choice: comma-separated, "
                        "or @FILE with one per line ('#' comments); add --max-emotions 0 for only these")
    p.add_argument("--min-positives", type=non_negative_int, default=10, metavar="N",
                   help="data-driven choice: an emotion needs N eligible positives (default 10)")
    p.add_argument("--max-emotions", type=non_negative_int, default=200, metavar="N",
                   help="data-driven choice: at most N emotions in all, most positives first (default 200)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _parse_emotions(parser: argparse.ArgumentParser, spec: str | None) -> list[str]:
    if spec is None:
        return []
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            parser.error(f"--emotions: cannot read {path}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            parser.error(f"--emotions: {path} is not UTF-8 text")
        items = [line.split("#", 1)[0].strip() for line in lines]
        where = str(path)
    else:
        items = [s.strip() for s in spec.split(",")]
        where = "--emotions"
    names = []
    for item in items:
        if not item:
            continue
        try:
            names.append(check_emotion_name(item))
        except ValueError as exc:
            parser.error(f"{where}: {exc}")
    if not names:
        parser.error(f"{where}: no emotion names given")
    return list(dict.fromkeys(names))


def format_table(index: dict[str, Any]) -> str:
    """The per-emotion summary printed after a run."""
    header = ("emotion", "positives", "negatives", "train/holdout", "node types (pos | neg)", "")
    rows = [header]
    for name in index["emotion_order"]:
        e = index["emotions"][name]
        mix = " | ".join(
            ", ".join(f"{t}:{n}" for t, n in e["node_types"][pol].items()) or "-"
            for pol in ("positive", "negative")
        )
        split = (f"{e['train_positives']}/{e['holdout_positives']} + "
                 f"{e['train_negatives']}/{e['holdout_negatives']}")
        note = ("! " + "; ".join(e["problems"])) if e["problems"] else ""
        rows.append((name, str(e["positives"]), str(e["negatives"]), split, mix, note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < len(header) - 1 else cell for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.memory_mcp_url is not None and args.memory_file is not None:
        parser.error("give either --memory-mcp-url or --memory-file, not both")
    emotions = _parse_emotions(parser, args.emotions)
    params = SelectionParams(
        min_positive_score=args.min_positive_score,
        max_negative_mentions=args.max_negative_mentions,
        min_content_chars=args.min_content_chars,
        max_examples_per_emotion=args.max_examples_per_emotion,
        holdout_fraction=args.holdout_fraction,
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # One INFO line per HTTP request would drown the progress bar.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # the MCP SDK's HTTP client

    try:
        source = open_source(memory_mcp_url=args.memory_mcp_url, memory_file=args.memory_file)
    except ValueError as exc:
        parser.error(f"--memory-mcp-url: {exc}")
    with tqdm(desc=f"reading {source.description}", unit=" nodes", file=sys.stderr,
              disable=args.quiet, leave=False) as bar:
        try:
            nodes, report = source.fetch_nodes(progress=lambda n: bar.update(n - bar.n))
        except MemoryGraphError as exc:
            bar.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        index = run_extraction(
            nodes, args.output_dir, params,
            emotions=emotions, min_positives=args.min_positives, max_emotions=args.max_emotions,
            extra={"source": source.description},
        )
    except ExamplesFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    snap = index["snapshot"]
    sel = index["emotion_selection"]
    print(f"read {snap['nodes']} nodes from {source.description} ({snap['tagged_nodes']} tagged, "
          f"{report.n_skipped} skipped, {snap['malformed_tag_tokens']} malformed tag tokens dropped)")
    print(f"{sel['emotions_qualifying']} of {sel['emotions_seen']} emotions selected "
          f"(train/holdout shown as positives + negatives)")
    if index["emotion_order"]:
        print(format_table(index))
    unusable = [n for n in index["emotion_order"] if index["emotions"][n]["problems"]]
    if unusable:
        print(f"warning: {len(unusable)} emotion(s) cannot be trained as they stand: {', '.join(unusable)}",
              file=sys.stderr)
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
