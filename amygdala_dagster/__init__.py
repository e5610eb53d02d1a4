"""Per-emotion readout vectors for an LLM, trained from its own memory graph.

The packages follow the data: :mod:`.graph` (memory graph, tag lines) -> :mod:`.examples`
(training examples) -> :mod:`.engine` (model, forward passes, activation cache) -> :mod:`.readout`
(directions, calibration, the vLLM pair) -> :mod:`.evaluation` (report, trace). :mod:`.workflow`
builds the engine from settings and owns the artefact layout; :mod:`.pipeline` (Dagster) and
:mod:`.commands` (command lines) sit on top; :mod:`.files` holds the shared I/O helpers at the
bottom. Imports point down only; nothing below :mod:`.pipeline` imports Dagster.
"""

__version__ = "0.1.0"
