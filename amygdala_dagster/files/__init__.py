"""Stage 0, shared I/O helpers at the bottom of the tree: atomic writes and file hashes (:mod:`.atomic`), local
paths and fsspec URLs behind one interface (:mod:`.storage`), JSON and JSONL reading (:mod:`.jsonio`).

Owns no contract; nothing here knows about emotions, models or Dagster, and every stage above uses it.
"""
