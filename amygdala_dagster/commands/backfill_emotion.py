"""``amygdala backfill-emotion NAME [NAME...]``: add emotion partitions, materialise them, refresh the readout."""

from __future__ import annotations

import argparse

from amygdala_dagster.commands.run import add_common_flags, execute
from amygdala_dagster.pipeline.runner import backfill_emotions

HELP = "add emotions as partitions, materialise them in one run and refresh vectors, manifest and report"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="emotion name(s), e.g. nostalgia")
    add_common_flags(parser)


def main(args: argparse.Namespace) -> int:
    return execute("backfill-emotion", args,
                   lambda resources, instance: backfill_emotions(args.names, resources, instance))
