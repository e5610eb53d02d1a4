"""Per-emotion readout vectors for an LLM, trained from its own memory graph.

The top-level modules form the core library and never import Dagster; the
Dagster layer lives in :mod:`amygdala_dagster.pipeline`.
"""

__version__ = "0.1.0"
