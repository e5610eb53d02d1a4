"""The command lines: the ``amygdala`` sub-commands (:mod:`.cli` dispatches) and the seed scripts' mains.

Owns Contract 5 (commands, flags, exit status). Argument parsing and messages only: the work is the
workflow's (and, for ``run`` and ``backfill-emotion``, the Dagster pipeline's).
"""
