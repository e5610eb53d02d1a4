"""`amygdala trace` throughput against a bare forward, and what token calibration adds to `amygdala run`.

CPU, the bundled MiniLM, the bundled 60 conversation snippets and sample graph.

1. Trace vs bare forward over the same texts, same batch size, one thread,
   interleaved repeats (median): the bare forward is ``model(input_ids,
   attention_mask)`` through every layer (what a runtime runs anyway); the
   trace is the runtime reference's per-token scoring (hooks, projection and
   z-scores of every concept at every hooked layer) and then the trace
   records, JSON and HTML. Goal: throughput >= 0.9x the bare forward.
2. Token calibration of the sample graph's 16 emotions as a run does it (the
   calibration sample of held-out texts under the token budget, then
   ``calibrate_readout`` on the per-token cache): cold (the sample forwarded
   per token, per-token cache written) and warm (cache read), next to the
   activation step's cold forward of all 219 example texts measured in the
   same run.

    python benchmarks/trace.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amygdala_dagster.data import conversation_snippets_path, sample_graph_path  # noqa: E402
from amygdala_dagster.engine.activations import ActivationEngine  # noqa: E402
from amygdala_dagster.engine.cache import ActivationCache  # noqa: E402
from amygdala_dagster.engine.forward import ensure_cached  # noqa: E402
from amygdala_dagster.engine.inputs import read_inputs  # noqa: E402
from amygdala_dagster.engine.models import load_model  # noqa: E402
from amygdala_dagster.engine.token_cache import TokenCache  # noqa: E402
from amygdala_dagster.evaluation.trace import build_trace, render_trace_html  # noqa: E402
from amygdala_dagster.examples.catalog import emotion_catalog, qualifying_emotions  # noqa: E402
from amygdala_dagster.examples.selection import SelectionParams, select_all  # noqa: E402
from amygdala_dagster.readout.runtime import ReadoutRuntime  # noqa: E402
from amygdala_dagster.readout.token_calibration import calibrate_readout, calibration_entries  # noqa: E402
from amygdala_dagster.readout.vectors import train_readout  # noqa: E402
from amygdala_dagster.workflow.samples import (  # noqa: E402
    RunSamples,
    calibration_sample,
    forward_run,
    held_out_negatives,
)

LAYERS = [3, 4]
BATCH = 8


def bare_forward(rt: ReadoutRuntime, encoded: list) -> None:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for s in range(0, len(order), BATCH):
        batch = [encoded[i].ids for i in order[s:s + BATCH]]
        n = max(len(x) for x in batch)
        ids = torch.full((len(batch), n), rt._pad_id)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        with torch.inference_mode():
            rt.model(input_ids=ids, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("minilm", device="cpu")
    snapshot_sets, readout = _sample_readout(loaded)
    records = read_inputs(conversation_snippets_path())
    items = [r.item for r in records]
    rt = ReadoutRuntime(loaded.model, loaded.tokenizer, readout, batch_size=BATCH, max_tokens=512)
    encoded = [rt.encode(x) for x in items]
    tokens = sum(len(e) for e in encoded)
    bare_forward(rt, encoded)  # warm-up
    # The runtime reference stops after the deepest hooked layer (4 of 0..5); hooking the last layer as
    # well makes it run the whole model, as a serving runtime does.
    from types import SimpleNamespace

    deep = SimpleNamespace(concepts=readout.concepts, layers=[3, 5], manifest=readout.manifest,
                           vectors={3: readout.vectors[3], 5: readout.vectors[4]})
    rt_deep = ReadoutRuntime(loaded.model, loaded.tokenizer, deep, batch_size=BATCH, max_tokens=512)
    times = {"bare forward": [], "trace: scores": [], "trace: scores + JSON + HTML": [],
             "trace: scores, hooks through the last layer": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        bare_forward(rt, encoded)
        times["bare forward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = rt.score_many(items, ids=[r.id for r in records])
        times["trace: scores"].append(time.perf_counter() - t)
        trace = build_trace(scores, LAYERS[-1], readout.manifest)
        json.dumps(trace)
        render_trace_html(trace)
        times["trace: scores + JSON + HTML"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rt_deep.score_many(items)
        times["trace: scores, hooks through the last layer"].append(time.perf_counter() - t)
    base = statistics.median(times["bare forward"])
    print(f"\n## 1. trace vs bare forward: {len(items)} conversations, {tokens} tokens, MiniLM, batch {BATCH}, "
          f"{len(readout.concepts)} concepts x {len(LAYERS)} layers, median of {args.repeats}\n")
    print("| what | s | tokens/s | throughput vs bare forward |\n|---|---:|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {tokens / m:,.0f} | {base / m:.2f}x |")

    print("\n## 2. token calibration's added cost (16 emotions, held-out negatives)\n")
    with tempfile.TemporaryDirectory() as tmp:
        engine = ActivationEngine(loaded, LAYERS, batch_size=16)
        texts = sorted({e.text for s in snapshot_sets.values() for e in (*s.positives, *s.negatives)})
        with ActivationCache(tmp, engine.fingerprint) as cache:
            t = time.perf_counter()
            ensure_cached(engine, cache, texts, progress=False)
            act = time.perf_counter() - t
            t = time.perf_counter()
            _, n_cal = token_calibration(engine, cache, snapshot_sets, readout)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            token_calibration(engine, cache, snapshot_sets, readout)
            warm = time.perf_counter() - t
    print("| step | s | vs activation forward |\n|---|---:|---:|")
    print(f"| activation forward, {len(texts)} unique example texts (cold cache) | {act:.2f} | 1.00x |")
    print(f"| token calibration, cold ({n_cal} held-out texts forwarded per token) | {cold:.2f} | {cold / act:.2f}x |")
    print(f"| token calibration, warm (per-token cache) | {warm:.2f} | {warm / act:.2f}x |")


def token_calibration(engine, cache, sets, readout):
    """The token calibration of ``readout`` as a run computes it (workflow.training.train_readout_pair):
    the calibration sample of held-out texts, forwarded per token where the per-token cache lacks it, then
    calibrated from that cache. Returns the calibration and the number of texts in the sample."""
    sample = calibration_sample(engine.tokenizer, engine.max_tokens, holdout=held_out_negatives(sets))
    forward_run(engine, cache, [], None, RunSamples(sample), progress=False)
    entries, source = calibration_entries(sample, sets, readout.concepts)
    tokens = TokenCache(cache.root, engine.fingerprint, engine.loaded.dtype)
    return calibrate_readout(readout, entries, tokens, hidden_layers=engine.layers, source=source), len(sample.entries)


def _sample_readout(loaded):
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.graph.sources import open_source
    from amygdala_dagster.readout.manifest import load_readout, write_readout

    snapshot = build_snapshot(open_source(memory_file=str(sample_graph_path())).fetch_nodes()[0])
    sets = select_all(snapshot, qualifying_emotions(emotion_catalog(snapshot)), SelectionParams())
    tmp = Path(tempfile.mkdtemp())
    engine = ActivationEngine(loaded, LAYERS, batch_size=16)
    texts = sorted({e.text for s in sets.values() for e in (*s.positives, *s.negatives)})
    with ActivationCache(tmp / "cache", engine.fingerprint) as cache:
        ensure_cached(engine, cache, texts, progress=False)
        ro = train_readout(sets, cache, LAYERS)
        tc, _ = token_calibration(engine, cache, sets, ro)
    write_readout(tmp / "v.safetensors", tmp / "m.json", ro, model="minilm", model_revision=None, dtype="float32",
                  pooling="mean", layer_path=None, fingerprint=engine.fingerprint, training={}, calibration=None,
                  token_calibration=tc)
    return sets, load_readout(tmp / "v.safetensors", tmp / "m.json")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
