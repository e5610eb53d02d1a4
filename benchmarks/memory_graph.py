"""Memory-graph benchmark: reading a graph of thousands of nodes and selecting ~200 emotions.

One process, one synthetic graph (``--nodes`` nodes, ``--emotions`` emotion
names, 1-5 tags per node, 2% duplicated bodies), everything measured in the
same run:

- read: the JSONL export (the baseline) and the same file through
  ``amygdala serve-graph`` + the MCP client, at two page sizes; one
  ``graph_version`` call;
- selection: the snapshot, the emotion catalog, ``select_all`` for every
  emotion (one parse) against ``select_examples`` called once per emotion;
- cap stability (Contract 2): with a small cap, add nodes and count, per
  emotion, earlier choices displaced; it must never exceed the new eligible
  nodes of that emotion.

    python benchmarks/memory_graph.py                       # 3,000 nodes, 200 emotions
    python benchmarks/memory_graph.py --nodes 10000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import format_table, machine_info  # noqa: E402

from amygdala_dagster.examples.catalog import emotion_catalog, qualifying_emotions  # noqa: E402
from amygdala_dagster.examples.selection import SelectionParams, select_all, select_examples  # noqa: E402
from amygdala_dagster.graph.mcp_source import McpSource  # noqa: E402
from amygdala_dagster.graph.snapshot import build_snapshot  # noqa: E402
from amygdala_dagster.graph.sources import JsonlSource  # noqa: E402

WORDS = ("light window morning letter river quiet walk friend call plan code poem rain kitchen "
         "train evening thought garden book music late early long short warm cold").split()


def emotion_names(n: int) -> list[str]:
    base = ["warmth", "curiosity", "clarity", "joy", "calm", "awe", "grief", "relief", "pride", "İlham",
            "self-doubt", "quiet_pride", "ärger", "静けさ"]
    return (base + [f"feeling-{i:03d}" for i in range(n)])[:n]


def make_nodes(rng: random.Random, n: int, emotions: list[str], start: int = 0) -> list[dict[str, Any]]:
    nodes = []
    for i in range(start, start + n):
        if i > start and rng.random() < 0.02:  # a copy of an earlier body under another key
            body = nodes[rng.randrange(len(nodes))]["content"].split("\n")[0]
        else:
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + f" ({i})"
        weights = [1 / (1 + j) for j in range(len(emotions))]  # a long tail, like a real graph
        tags = {rng.choices(emotions, weights)[0]: rng.randint(0, 10) for _ in range(rng.randint(1, 5))}
        nodes.append({
            "key": f"node/{i:06d}",
            "node_type": rng.choice(["journal", "digest", "pattern", "core"]),
            "content": body + "\n" + " ".join(f"{e}:{s}" for e, s in tags.items()),
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-02T00:00:00Z",
        })
    return nodes


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """(median seconds, last result) over ``repeat`` runs."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "amygdala_dagster.commands.cli", "serve-graph",
         "--file", str(path), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("serve-graph did not start") from None
            time.sleep(0.05)


def cap_stability(nodes: list[dict], extra: list[dict], emotions: list[str], cap: int) -> dict[str, int]:
    """Worst case over emotions of (earlier choices displaced) - (new eligible nodes); must be <= 0."""
    from amygdala_dagster.graph.nodes import MemoryNode

    params = SelectionParams(max_examples_per_emotion=cap, min_positive_score=6)
    before = select_all(build_snapshot(MemoryNode(**n) for n in nodes), emotions, params)
    after = select_all(build_snapshot(MemoryNode(**n) for n in nodes + extra), emotions, params)
    new_keys = {n["key"] for n in extra}
    worst, capped = -10**9, 0
    for e in emotions:
        for pol in ("positive", "negative"):
            old = {x.key for x in before[e].examples(pol)}
            new = {x.key for x in after[e].examples(pol)}
            displaced = len(old - new)
            added = len({k for k in new - old if k in new_keys})
            eligible_new = (after[e].n_eligible_positive if pol == "positive" else after[e].n_eligible_negative) - (
                before[e].n_eligible_positive if pol == "positive" else before[e].n_eligible_negative)
            if len(old) >= cap:
                capped += 1
            worst = max(worst, displaced - max(eligible_new, added))
    return {"cap": cap, "lists_at_cap": capped, "worst_excess_displaced": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3000)
    p.add_argument("--emotions", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    rng = random.Random(7)
    emotions = emotion_names(args.emotions)
    raws = make_nodes(rng, args.nodes, emotions)
    results: dict[str, Any] = {"machine": machine_info(), "nodes": args.nodes, "emotions": args.emotions}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.jsonl"
        path.write_text("".join(json.dumps(n, ensure_ascii=False) + "\n" for n in raws), encoding="utf-8")
        results["file_mib"] = round(path.stat().st_size / 2**20, 2)

        t_jsonl, (nodes, _) = timed(lambda: JsonlSource(path).fetch_nodes(), args.repeat)
        proc, url = start_server(path)
        try:
            McpSource(url).graph_version()  # the server loads the file once, outside the timing
            t_version, _ = timed(lambda: McpSource(url).graph_version(), args.repeat)
            t_mcp200, (mcp_nodes, _) = timed(lambda: McpSource(url, page_size=200).fetch_nodes(), args.repeat)
            t_mcp1000, _ = timed(lambda: McpSource(url, page_size=1000).fetch_nodes(), args.repeat)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        assert mcp_nodes == nodes, "the MCP read and the file read differ"
        read_rows = [
            ["JSONL file (baseline)", t_jsonl, 1.0],
            ["MCP, page_size 200", t_mcp200, t_mcp200 / t_jsonl],
            ["MCP, page_size 1000", t_mcp1000, t_mcp1000 / t_jsonl],
            ["MCP graph_version (one call)", t_version, t_version / t_jsonl],
        ]

        t_snap, snap = timed(lambda: build_snapshot(nodes), args.repeat)
        params = SelectionParams()
        t_cat, cat = timed(lambda: emotion_catalog(snap, params, min_positives=1, max_emotions=args.emotions),
                           args.repeat)
        names = qualifying_emotions(cat)
        t_all, sets = timed(lambda: select_all(snap, names, params), args.repeat)
        t_each, _ = timed(lambda: [select_examples(snap, e, params) for e in names], 1)
        sel_rows = [
            ["build_snapshot", t_snap, None],
            [f"emotion_catalog ({cat.height} emotions)", t_cat, None],
            [f"select_examples x {len(names)} (baseline)", t_each, 1.0],
            [f"select_all, {len(names)} emotions", t_all, t_all / t_each if t_each else None],
        ]
        stability = cap_stability(raws, make_nodes(random.Random(8), max(1, args.nodes // 10), emotions,
                                                   start=args.nodes), names, cap=20)

    print(f"# memory graph: {args.nodes} nodes, {args.emotions} emotion names, {results['file_mib']} MiB\n")
    print(format_table(["read", "seconds", "x baseline"], read_rows))
    print()
    print(format_table(["selection", "seconds", "x baseline"], sel_rows))
    print()
    print(format_table(["cap stability (add 10% nodes)", "value"], [[k, v] for k, v in stability.items()]))
    ok = stability["worst_excess_displaced"] <= 0
    print(f"\ncap stability {'holds' if ok else 'VIOLATED'}: no emotion lost more earlier choices than it gained "
          "new eligible nodes")
    results.update({
        "read_seconds": {r[0]: round(r[1], 4) for r in read_rows},
        "selection_seconds": {r[0]: round(r[1], 4) for r in sel_rows},
        "cap_stability": stability,
        "positives_kept": sum(len(s.positives) for s in sets.values()),
    })
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
