"""Stage 1, the memory graph: nodes and their tag lines, read from an MCP server or a JSONL export.

Owns Contract 1 (tag lines: :mod:`.tags`) and Contract 4 (the memory-graph protocol: the client in
:mod:`.mcp_source`, the JSONL export in :mod:`.sources`, the server ``amygdala serve-graph`` in :mod:`.server`). :mod:`.snapshot` turns the
nodes into one Parquet table with a content hash.
"""
