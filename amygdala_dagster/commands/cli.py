"""The ``amygdala`` command: a thin shell that dispatches to ``amygdala_dagster.commands``.

Each sub-command lives in its own module under :mod:`amygdala_dagster.commands`
exposing ``HELP: str``, ``configure(parser)`` and ``main(args) -> int``. The one
lazy import of the project is here: only the chosen command's module is
imported, so ``amygdala serve-graph`` and ``amygdala --help`` never pay for
importing torch and Dagster (measured: ``amygdala serve-graph --help`` 1.5 s,
``amygdala run --help`` 4 s on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from amygdala_dagster.workflow.settings import ConfigurationError, current_settings

COMMANDS: dict[str, str] = {
    "run": "amygdala_dagster.commands.run",
    "serve-graph": "amygdala_dagster.commands.serve_graph",
    "inspect": "amygdala_dagster.commands.inspect",
    "backfill-emotion": "amygdala_dagster.commands.backfill_emotion",
    "report": "amygdala_dagster.commands.report",
    "trace": "amygdala_dagster.commands.trace",
}


DESCRIPTION = (
    "Train per-emotion readout vectors for a language model from its memory graph, as Dagster assets. "
    "With no options, `amygdala run` trains on the bundled sample graph with the bundled small model."
)

_SUMMARIES: dict[str, str] = {
    "run": "materialise the whole asset graph (default: bundled sample graph and model)",
    "serve-graph": "serve a JSONL memory graph over MCP (Contract 4)",
    "inspect": "validate and describe a vectors/manifest pair",
    "backfill-emotion": "add emotion partitions and materialise them",
    "report": "(re)build the evaluation report from existing artefacts",
    "trace": "per-token readout of every concept over conversations or text (HTML + JSON)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="amygdala", description=DESCRIPTION,
                                     epilog="`amygdala COMMAND --help` shows a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen command's module is imported; the others are listed by name.
    chosen = next((a for a in argv if a in COMMANDS), None)
    try:
        # Every AMYGDALA_* value is checked once, before any work (and before a command module builds the
        # code location on import): one line naming a bad one, exit 2.
        current_settings()
    except ConfigurationError as exc:
        print(f"amygdala{' ' + chosen if chosen else ''}: {exc}", file=sys.stderr)
        return 2
    for name, module_path in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_path)
            sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
            module.configure(sp)
            sp.set_defaults(_main=module.main)
        else:
            sub.add_parser(name, add_help=False, help=_SUMMARIES.get(name))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx (httpx2 in the MCP SDK) logs every request and alembic every migration step at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        # Log lines go through tqdm.write, so they never land in the middle of a progress bar.
        with logging_redirect_tqdm():
            return int(args._main(args) or 0)
    except BrokenPipeError:
        # `amygdala inspect DIR | head`: the reader went away; no traceback (Python's documented recipe:
        # point stdout at devnull so the interpreter's final flush does not raise again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
