"""Per-emotion readout vectors for an LLM, trained from its own memory graph.

The packages follow the data: :mod:`.graph` (memory graph, tag lines) -> :mod:`.examples`
(training examples) -> :mod:`.engine` (model, forward passes, activation cache) -> :mod:`.readout`
(directions, calibration, the vLLM pair) -> :mod:`.evaluation` (report, trace), with :mod:`.files`
(shared I/O helpers) at the bottom. :mod:`.workflow` sits above them: it reads the ``AMYGDALA_*``
settings, builds the engine and owns the artefact layout. :mod:`.pipeline` (Dagster) and
:mod:`.commands` (command lines) sit on top. Imports point down only; nothing below :mod:`.pipeline`
imports Dagster, nothing below :mod:`.workflow` reads the settings (docs/architecture.md).
"""

__version__ = "0.1.0"
