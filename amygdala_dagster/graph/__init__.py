"""Stage 1, the memory graph: nodes and their tag lines, read from an MCP server or a JSONL export.

Owns Contract 1, tag lines (:mod:`.tags`), and Contract 4, the memory-graph protocol: the node record
and what every source shares (:mod:`.nodes`), the MCP client (:mod:`.mcp_source`), the JSONL export and
the choice of source (:mod:`.sources`), the server ``amygdala serve-graph`` (:mod:`.server`).
:mod:`.snapshot` turns the nodes into one Parquet table with a content hash.
"""
