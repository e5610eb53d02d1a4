"""Model work of one cold `amygdala run`: tokens forwarded against the tokens of the unique inputs it needs,
weight loads, and the bytes the activation caches hold (pooled against per-token).

Runs ``amygdala run --calibration-texts C --eval-conversations E`` in process, cold (fresh output and cache),
once per code tree given with ``--tree`` (e.g. this checkout and a checkout of an earlier commit: the same
graph and inputs, measured side by side), counting every sequence the model forwards at the engine's and the
runtime's batch functions. The unique inputs are counted once, with this checkout's tokenizer: every example
text and snippet (pooled), every calibration text and evaluation conversation (per token), a plain text that is
both counted once. ``python benchmarks/forward_once.py [--tree DIR ...] [--graph G.jsonl] [--json FILE]``.
The default inputs split the bundled labelled snippets: the first half calibrates, the second half is evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

DRIVER = r'''
import json, sys, os, time
tree, out, cache, graph, cal, conv, result = sys.argv[1:8]
sys.path.insert(0, tree)
counts = {"tokens": 0, "sequences": 0, "weight_loads": 0}

def _mod(*names):
    import importlib
    for n in names:
        try:
            return importlib.import_module(n)
        except ImportError:
            pass
    raise ImportError(names)

# the earlier flat layout first: an editable install of this checkout would answer the new names for any tree
A = _mod("amygdala_dagster.activations", "amygdala_dagster.engine.activations")
R = _mod("amygdala_dagster.runtime", "amygdala_dagster.readout.runtime")
M = _mod("amygdala_dagster.models", "amygdala_dagster.engine.models")
CLI = _mod("amygdala_dagster.cli", "amygdala_dagster.commands.cli")
orig_engine, orig_runtime, orig_load = A.ActivationEngine._run_batch, R.ReadoutRuntime._run_batch, M.load_model

def engine_batch(self, ids, batch, *a, **k):
    counts["tokens"] += sum(len(ids[i]) for i in batch); counts["sequences"] += len(batch)
    return orig_engine(self, ids, batch, *a, **k)

def runtime_batch(self, ids, *a, **k):
    counts["tokens"] += sum(len(x) for x in ids); counts["sequences"] += len(ids)
    return orig_runtime(self, ids, *a, **k)

def load(*a, **k):
    if k.get("weights", True):
        counts["weight_loads"] += 1
    return orig_load(*a, **k)

A.ActivationEngine._run_batch, R.ReadoutRuntime._run_batch, M.load_model = engine_batch, runtime_batch, load
os.environ["DAGSTER_HOME"] = os.path.join(out, "home")
os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
t0 = time.perf_counter()
code = CLI.main(["run", "--memory-file", graph, "--output-dir", out, "--cache-dir", cache,
                 "--calibration-texts", cal, "--eval-conversations", conv])
counts["seconds"] = round(time.perf_counter() - t0, 1)
counts["exit"] = code
json.dump(counts, open(result, "w"))
'''


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def cache_bytes(cache: Path) -> dict[str, int]:
    tokens = cache / "tokens"
    total = _du(cache)
    return {"per_token": _du(tokens), "pooled": total - _du(tokens)}


def unique_tokens(out: Path, graph: Path, cal: Path, conv: Path) -> dict[str, int]:
    """Tokens of the distinct inputs a run needs (this checkout's tokenizer and token limit)."""
    sys.path.insert(0, str(REPO))
    from amygdala_dagster.data import conversation_snippets_path
    from amygdala_dagster.engine.inputs import encode, read_inputs
    from amygdala_dagster.engine.models import load_model
    from amygdala_dagster.evaluation.generalisation import read_snippets
    from amygdala_dagster.examples.directory import read_examples_dir

    tokenizer = load_model("minilm", device="cpu", weights=False).tokenizer
    texts: set[str] = set()
    for directory in (out / "examples").iterdir():
        _, sets = read_examples_dir(directory)
        texts |= {e.text for s in sets.values() for e in (*s.positives, *s.negatives)}
    texts |= {s["text"] for s in read_snippets(conversation_snippets_path())}
    sequences = {tuple(encode(tokenizer, t, 512, pieces=False).ids) for t in texts}
    for record in [*read_inputs(cal), *read_inputs(conv, labelled=True)]:
        sequences.add(tuple(encode(tokenizer, record.item, 512, pieces=False).ids))
    return {"unique_inputs": len(sequences), "unique_tokens": sum(len(s) for s in sequences)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", action="append", type=Path, default=None, help="code tree to measure (repeatable)")
    p.add_argument("--graph", type=Path, default=REPO / "amygdala_dagster" / "data" / "sample_graph.jsonl")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    trees = args.tree or [REPO]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="amygdala-forward-once-") as tmp:
        work = Path(tmp)
        lines = (REPO / "amygdala_dagster" / "data" / "conversation_snippets.jsonl").read_text().splitlines()
        cal, conv = work / "calibration.jsonl", work / "conversations.jsonl"
        cal.write_text("".join(json.dumps({"id": json.loads(x)["id"], "text": json.loads(x)["text"]}) + "\n"
                               for x in lines[: len(lines) // 2]))
        conv.write_text("\n".join(lines[len(lines) // 2:]) + "\n")
        for i, tree in enumerate(trees):
            out, cache, result = work / f"out{i}", work / f"cache{i}", work / f"result{i}.json"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AMYGDALA_", "DAGSTER_"))}
            env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(tree))
            proc = subprocess.run([sys.executable, "-c", DRIVER, str(tree), str(out), str(cache), str(args.graph),
                                   str(cal), str(conv), str(result)], env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not result.exists():
                raise SystemExit(f"{tree}: the run failed:\n{proc.stderr[-4000:]}")
            row = {"tree": str(tree), **json.loads(result.read_text()), **cache_bytes(cache),
                   **unique_tokens(out, args.graph, cal, conv)}
            row["forwarded_per_unique"] = round(row["tokens"] / row["unique_tokens"], 3)
            row["cache_per_pooled"] = round((row["pooled"] + row["per_token"]) / max(row["pooled"], 1), 2)
            rows.append(row)
    print(f"{'tree':<40}{'tokens fwd':>11}{'unique tok':>11}{'ratio':>7}{'loads':>6}{'pooled B':>11}"
          f"{'per-token B':>12}{'cache/pooled':>13}{'s':>7}")
    for r in rows:
        print(f"{Path(r['tree']).name[:39]:<40}{r['tokens']:>11}{r['unique_tokens']:>11}{r['forwarded_per_unique']:>7}"
              f"{r['weight_loads']:>6}{r['pooled']:>11}{r['per_token']:>12}{r['cache_per_pooled']:>13}"
              f"{r['seconds']:>7}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
