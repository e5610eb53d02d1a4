"""Shard benchmark: the forward work of one job as 1 process with T threads vs N processes with T/N threads.

Every configuration forwards the same unique texts (the bundled sample graph's
example texts, or a multiple of them with ``--copies``) into a fresh activation
cache through :func:`amygdala_dagster.engine.shards.run_shards_locally`, so each
process starts, loads the model once and forwards its shard, exactly as a
shard step does. Configurations are interleaved round after round (order
reversed every other round) so drift on a shared machine hits all alike; the
table shows the median wall time (process start + model load + forward + cache
writes) and the slowest shard's forward time, with ratios against the
1-process baseline of the same run. The cached bytes are compared across
configurations (they must be identical).

    python benchmarks/shards.py                       # 1x2 threads vs 2x1 (this 2-core box), 2 rounds
    python benchmarks/shards.py --configs 1x1,1x2,2x1 --rounds 3 --json /tmp/shards.json
    python benchmarks/shards.py --tiny                # smoke run with a tiny random decoder (~1 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table, machine_info, median

REPO = Path(__file__).resolve().parent.parent


def sample_texts(copies: int) -> list[str]:
    """The unique example texts of the bundled sample (``copies`` > 1: each also with a numbered suffix)."""
    from extraction import all_examples, bundled_nodes, example_sets_for

    from amygdala_dagster.graph.snapshot import build_snapshot

    texts = sorted({x.text for x in all_examples(example_sets_for(build_snapshot(bundled_nodes())))})
    return texts + [f"{t}\n\n(copy {k})" for k in range(1, copies) for t in texts]


def parse_configs(spec: str) -> list[tuple[int, int]]:
    """``"1x2,2x1"`` -> [(processes, threads each), ...]."""
    out = []
    for part in spec.split(","):
        n, _, t = part.strip().partition("x")
        out.append((int(n), int(t)))
    return out


def cache_digest(cache_root: Path, fingerprint: dict, shas: Sequence[str]) -> str:
    from amygdala_dagster.engine.cache import ActivationCache

    return hashlib.sha256(ActivationCache(cache_root, fingerprint).get(list(shas)).tobytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--layers", default=None, help="target layers (default: the train command's default)")
    p.add_argument("--configs", default="1x2,2x1", help="processes x threads each; the first is the baseline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--copies", type=int, default=1, help="multiply the sample's texts (more work per shard)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the engine's token budget")
    p.add_argument("--tiny", action="store_true", help="smoke run: a tiny random-weight decoder, 1 round")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from amygdala_dagster.engine.cache import text_sha256
    from amygdala_dagster.engine.models import load_model
    from amygdala_dagster.engine.shards import EngineSpec, run_shards_locally
    from amygdala_dagster.workflow.engine_settings import default_target_layers

    model = args.model
    if args.tiny:
        sys.path.insert(0, str(REPO))
        from amygdala_dagster_tests.tiny_models import build_tiny_model

        model, args.rounds = build_tiny_model("qwen3"), 1
    configs = parse_configs(args.configs)
    meta = load_model(model, device="cpu", dtype="fp32", weights=False)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else default_target_layers(meta.num_layers))
    spec = EngineSpec(model=model, layers=layers, dtype="fp32", device="cpu", batch_size=args.batch_size)
    texts = sample_texts(args.copies)
    shas = [text_sha256(t) for t in texts]
    info = machine_info()
    print("# amygdala-dagster shard benchmark\n")
    command = [os.path.relpath(__file__, REPO)] + list(sys.argv[1:] if argv is None else argv)
    print("command: python " + " ".join(command))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {meta.model_id}, layers {layers}; {len(texts)} unique texts; configs {args.configs}; "
          f"{args.rounds} round(s)\n", flush=True)

    work = Path(tempfile.mkdtemp(prefix="amygdala-shards-bench-"))
    fingerprint = spec.build().fingerprint
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {c: [] for c in configs}
    digests: dict[tuple[int, int], set[str]] = {c: set() for c in configs}
    try:
        for rnd in range(args.rounds):
            for n, t in (configs if rnd % 2 == 0 else configs[::-1]):
                root = work / f"cache-{n}x{t}-{rnd}"
                t0 = time.perf_counter()
                results = run_shards_locally(spec, root, texts, n, threads=n * t, timeout_s=3600)
                wall = time.perf_counter() - t0
                forwarded = sum(r.stats.forwarded for r in results)
                assert forwarded == len(texts), (forwarded, len(texts))
                runs[(n, t)].append({
                    "wall_s": wall,
                    "forward_s": max(r.stats.seconds for r in results),
                    "tokens": sum(r.stats.tokens for r in results),
                    "per_shard": [r.to_dict() for r in results],
                })
                digests[(n, t)].add(cache_digest(root, fingerprint, shas))
                print(f"round {rnd + 1}: {n} process(es) x {t} thread(s): {wall:.1f} s", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = configs[0]
    base_wall = median([r["wall_s"] for r in runs[base]])
    base_fwd = median([r["forward_s"] for r in runs[base]])
    rows, out = [], []
    for n, t in configs:
        wall = median([r["wall_s"] for r in runs[(n, t)]])
        fwd = median([r["forward_s"] for r in runs[(n, t)]])
        tokens = runs[(n, t)][0]["tokens"]
        rows.append([f"{n} process(es) x {t} torch thread(s)", n, t, wall, fwd, tokens, tokens / fwd,
                     f"{base_wall / wall:.2f}x", f"{base_fwd / fwd:.2f}x"])
        out.append({"processes": n, "threads": t, "wall_s": [r["wall_s"] for r in runs[(n, t)]],
                    "forward_s": [r["forward_s"] for r in runs[(n, t)]], "tokens": tokens,
                    "per_shard": runs[(n, t)][-1]["per_shard"]})
    print()
    print(format_table(["configuration", "processes", "threads each", "wall s (median)",
                        "forward s, slowest shard (median)", "tokens", "tokens/s (forward)",
                        f"speed-up vs {base[0]}x{base[1]} (wall)", "speed-up (forward)"], rows))
    identical = len(set().union(*digests.values())) == 1
    print(f"\ncached activations identical across configurations and rounds: {identical}")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "model": meta.model_id, "layers": layers, "texts": len(texts),
                                         "results": out, "identical": identical}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
