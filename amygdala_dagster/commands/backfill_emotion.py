"""``amygdala backfill-emotion NAME [NAME...]``: add emotion partitions, materialise them, refresh the readout."""

from __future__ import annotations

import argparse
import sys

from amygdala_dagster.commands.run import add_common_flags, build_resources, report_result

HELP = "add emotions as partitions, materialise them in one run and refresh vectors, manifest and report"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="emotion name(s), e.g. nostalgia")
    add_common_flags(parser)


def main(args: argparse.Namespace) -> int:
    from amygdala_dagster.pipeline.runner import backfill_emotions, get_instance
    from amygdala_dagster.sources import MemoryGraphError

    try:
        resources = build_resources(args)
        with get_instance() as instance:
            result = backfill_emotions(args.names, resources, instance)
            return report_result(result, resources, "backfill-emotion")
    except (MemoryGraphError, ValueError, FileNotFoundError) as exc:
        print(f"amygdala backfill-emotion: {exc}", file=sys.stderr)
        return 2
