"""Extraction benchmark: cost per unique text, not per emotion x example.

Runs in one process, methods interleaved run after run, on the same data,
model and layers:

1. compare  -- this project end to end (selection is done once, outside the
   timing; then engine + activation cache + train_readout + writing the
   vectors/manifest pair, exactly what ``train_steering_vectors`` does), cold
   and warm cache; the seed's naive method (per emotion, positives and
   negatives forwarded with ``output_hidden_states=True``, full model, batch
   size 4, no cache); the steering-vectors library (``train_steering_vector``,
   mean aggregator) and repeng (``ControlVector.train``) on the same texts and
   layers. Cosine between our vectors and the naive method's (same pooling).
2. scaling  -- time and peak memory vs number of emotions (synthetic tags over
   the bundled texts) and vs number of nodes (synthetic nodes made by
   combining the bundled texts); the cost of adding one emotion after a run.
3. engine   -- engine tokens/s vs a bare ``model(input_ids, attention_mask)``
   over the same length-sorted batches, and the early stop's savings.

    pip install -e ".[bench]"
    pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0   # see benchmarks/README.md
    python benchmarks/extraction.py                 # default run (~10 min on 2 cores)
    python benchmarks/extraction.py --quick         # smoke run (~2 min)
    python benchmarks/extraction.py --nodes 1000,5000,20000 --peer-emotions all

Everything printed is also written as JSON with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would swamp the tables

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    Measure,
    PeakRSS,
    format_table,
    machine_info,
    measured,
    median,
    median_measure,
    mib,
)

log = logging.getLogger("benchmarks.extraction")

REPO = Path(__file__).resolve().parent.parent


# ============================================================================ data
def bundled_nodes() -> list:
    from amygdala_dagster.graph.sources import JsonlSource

    path = importlib.resources.files("amygdala_dagster") / "data" / "sample_graph.jsonl"
    nodes, _report = JsonlSource(str(path)).fetch_nodes()
    return nodes


def example_sets_for(snapshot, emotions: Sequence[str] | None = None, params=None) -> dict[str, Any]:
    """Contract 2 selection for ``emotions`` (default: the qualifying ones, as extract_training_pairs)."""
    from amygdala_dagster.examples.catalog import emotion_catalog, qualifying_emotions
    from amygdala_dagster.examples.selection import select_all

    if emotions is None:
        emotions = qualifying_emotions(emotion_catalog(snapshot, params))
    return select_all(snapshot, emotions, params)


def synthetic_emotion_nodes(base_nodes: Sequence, n_emotions: int, seed: int = 7) -> tuple[list, list[str]]:
    """The bundled bodies with their tags replaced by ``n_emotions`` synthetic ones.

    Each node gets each synthetic emotion with probability 0.3 at a score of 8-10
    (a positive) and always the untrained tag ``filler:1``, so every node has a
    valid tag and is a negative for the emotions it lacks.
    """
    from amygdala_dagster.graph.nodes import MemoryNode
    from amygdala_dagster.graph.tags import parse_tags

    rng = random.Random(seed)
    names = [f"syn{i:03d}" for i in range(n_emotions)]
    out = []
    for node in base_nodes:
        body = parse_tags(node.content).body
        tags = ["filler:1"] + [f"{e}:{rng.randint(8, 10)}" for e in names if rng.random() < 0.3]
        out.append(MemoryNode(node.key, node.node_type, f"{body}\n\n{' '.join(tags)}", node.created_at,
                              node.updated_at))
    return out, names


def synthetic_graph(base_nodes: Sequence, n_nodes: int, seed: int = 11) -> list:
    """``n_nodes`` distinct nodes, each the first half of one bundled body's paragraphs plus the second
    half of another's (so lengths stay those of the bundled texts), tagged with both parents' tags
    (the maximum where both have one)."""
    from amygdala_dagster.graph.nodes import MemoryNode
    from amygdala_dagster.graph.tags import parse_tags

    parsed = [parse_tags(n.content) for n in base_nodes]
    paras = [[p for p in x.body.split("\n\n") if p.strip()] for x in parsed]
    rng = random.Random(seed)
    n_base = len(base_nodes)
    if n_nodes > n_base * (n_base - 1):
        raise ValueError(f"at most {n_base * (n_base - 1)} synthetic nodes from {n_base} bundled ones")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < n_nodes:
        a, b = rng.randrange(n_base), rng.randrange(n_base)
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        pa, pb = paras[a], paras[b]
        head = pa[: max(1, (len(pa) + 1) // 2)]
        tail = pb[len(pb) // 2:] or pb
        scores = dict(parsed[a].scores)
        for e, s in parsed[b].scores.items():
            scores[e] = max(scores.get(e, 0.0), s)
        tag_line = " ".join(f"{e}:{s:g}" for e, s in sorted(scores.items()))
        content = "\n\n".join(head + tail) + (f"\n\n{tag_line}" if tag_line else "")
        base = base_nodes[a]
        out.append(MemoryNode(f"synthetic/{len(out):06d}", base.node_type, content, base.created_at,
                              base.updated_at))
    return out


def all_examples(sets: dict[str, Any]) -> list:
    return [x for s in sets.values() for x in list(s.positives) + list(s.negatives)]


def token_lengths(tokenizer, texts: Sequence[str], max_tokens: int = 512) -> list[int]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, add_special_tokens=True, padding=False)
    return [len(x) for x in enc["input_ids"]]


# ============================================================================ methods
def run_ours(loaded, layers: list[int], sets: dict[str, Any], cache_root: Path, out_dir: Path, *,
             batch_size: int = 4, max_batch_tokens: int = 16384) -> tuple[Any, Any]:
    """Engine + cache + train_readout + vectors/manifest pair: what train_steering_vectors runs."""
    from amygdala_dagster.engine.activations import ActivationEngine
    from amygdala_dagster.engine.cache import ActivationCache
    from amygdala_dagster.workflow.training import train_readout_pair

    engine = ActivationEngine(loaded, layers, pooling="mean", max_tokens=512, batch_size=batch_size,
                              max_batch_tokens=max_batch_tokens)
    cache = ActivationCache(cache_root, engine.fingerprint)
    result = train_readout_pair(engine, sets, cache, out_dir / "vectors.safetensors", progress=False)
    return result, engine


def read_our_vectors(result) -> dict[str, dict[int, np.ndarray]]:
    """{concept: {layer: unit vector}} from the written vectors file."""
    from safetensors.numpy import load_file

    tensors = load_file(str(result.vectors_path))
    out: dict[str, dict[int, np.ndarray]] = {c: {} for c in result.concepts}
    for layer in result.layers:
        mat = tensors[f"layer_{layer}.vectors"]
        for i, c in enumerate(result.concepts):
            out[c][layer] = mat[i].astype(np.float64)
    return out


def run_naive(loaded, layers: list[int], sets: dict[str, Any], *, batch_size: int = 4,
              max_tokens: int = 512) -> tuple[dict[str, dict[int, np.ndarray]], int, int, int]:
    """The original design: per emotion, forward its positives then its negatives through the full
    model with ``output_hidden_states=True`` in batches of 4, no cache; mean-pool the hidden states
    ``hidden_states[idx + 1]``; direction = mean(train positives) - mean(train negatives), unit norm.

    Returns (directions, texts forwarded, real tokens, padded tokens).
    """
    model, tok = loaded.model, loaded.tokenizer
    texts_n = tokens = padded = 0
    dirs: dict[str, dict[int, np.ndarray]] = {}
    for emotion, s in sets.items():
        sums = {pol: np.zeros((len(layers), loaded.hidden_size)) for pol in ("pos", "neg")}
        counts = {"pos": 0, "neg": 0}
        for pol, items in (("pos", list(s.positives)), ("neg", list(s.negatives))):
            for start in range(0, len(items), batch_size):
                batch = items[start:start + batch_size]
                enc = tok([x.text for x in batch], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
                enc = {k: v.to(loaded.device) for k, v in enc.items()}
                with torch.inference_mode():
                    out = model(**enc, output_hidden_states=True)
                mask = enc["attention_mask"].float()
                train = torch.tensor([x.split == "train" for x in batch])
                for li, layer in enumerate(layers):
                    h = out.hidden_states[layer + 1].float()
                    pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
                    sums[pol][li] += pooled[train].double().sum(0).cpu().numpy()
                counts[pol] += int(train.sum())
                texts_n += len(batch)
                tokens += int(enc["attention_mask"].sum())
                padded += int(enc["attention_mask"].numel())
                del out
        diff = sums["pos"] / max(counts["pos"], 1) - sums["neg"] / max(counts["neg"], 1)
        dirs[emotion] = {layer: diff[li] / np.linalg.norm(diff[li]) for li, layer in enumerate(layers)}
    return dirs, texts_n, tokens, padded


def pairs_for(s) -> list[tuple[str, str]]:
    """Positive/negative pairs covering every example of the set: max(P, N) pairs, the shorter list
    cycled (both peer APIs take contrast *pairs*; our data has unequal, unpaired lists)."""
    pos, neg = [x.text for x in s.positives], [x.text for x in s.negatives]
    n = max(len(pos), len(neg))
    return [(pos[i % len(pos)], neg[i % len(neg)]) for i in range(n)]


def run_steering_vectors(loaded, layers: list[int], sets: dict[str, Any], *, batch_size: int = 4) -> dict:
    from steering_vectors import train_steering_vector
    from steering_vectors.aggregators import mean_aggregator

    out = {}
    for emotion, s in sets.items():
        sv = train_steering_vector(loaded.model, loaded.tokenizer, pairs_for(s), layers=list(layers),
                                   aggregator=mean_aggregator(), batch_size=batch_size, move_to_cpu=True)
        out[emotion] = {k: v.double().numpy() for k, v in sv.layer_activations.items()}
    return out


class RepengAdapter(torch.nn.Module):
    """What ``repeng`` needs to drive a base model whose blocks are not at ``.model.layers``.

    repeng 0.4 finds the block list at ``model.model.layers`` (Mistral-like) or
    ``model.transformer.h`` (GPT-2-like) and reads ``hidden_states`` from
    ``model(**batch, output_hidden_states=True)``; only the block count is used.
    This adapter exposes the resolved blocks there and forwards to the model.
    """

    def __init__(self, base: torch.nn.Module, blocks: torch.nn.ModuleList) -> None:
        super().__init__()
        self.inner = base
        self.config = base.config
        object.__setattr__(self, "model", types.SimpleNamespace(layers=blocks))

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def import_repeng():
    """repeng 0.4 refers to ``np.float_`` at import (removed in NumPy 2): alias it first."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]
    import repeng

    return repeng


def run_repeng(loaded, layers: list[int], sets: dict[str, Any], *, batch_size: int = 4) -> dict:
    from amygdala_dagster.engine.layers import resolve_layers

    repeng = import_repeng()
    model: Any = loaded.model
    try:
        from repeng.control import model_layer_list

        model_layer_list(model)
    except ValueError:
        model = RepengAdapter(loaded.model,
                              torch.nn.ModuleList(resolve_layers(loaded.model, loaded.num_layers).modules))
    out = {}
    for emotion, s in sets.items():
        data = [repeng.DatasetEntry(positive=p, negative=n) for p, n in pairs_for(s)]
        cv = repeng.ControlVector.train(model, loaded.tokenizer, data, hidden_layers=list(layers),
                                        batch_size=batch_size)
        out[emotion] = {k: v.astype(np.float64) for k, v in cv.directions.items()}
    return out


def peer_counts(loaded, sets: dict[str, Any]) -> tuple[int, int]:
    """(texts, real tokens) a pairs-based peer forwards for ``sets`` (2 x max(P, N) per emotion)."""
    texts = [t for s in sets.values() for pair in pairs_for(s) for t in pair]
    lengths = token_lengths(loaded.tokenizer, texts, max_tokens=10**6)
    return len(texts), sum(lengths)


def peer_available(name: str) -> str | None:
    """None when the peer library imports, else why not."""
    try:
        if name == "repeng":
            import_repeng()
        else:
            __import__(name)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def cosines(a: dict[str, dict[int, np.ndarray]], b: dict[str, dict[int, np.ndarray]]) -> list[float]:
    out = []
    for emotion, per_layer in a.items():
        for layer, v in per_layer.items():
            w = b[emotion][layer]
            out.append(float(np.dot(v, w) / (np.linalg.norm(v) * np.linalg.norm(w))))
    return out


# ============================================================================ sections
def section_compare(loaded, layers, sets, args, work: Path, report: dict) -> None:
    examples = all_examples(sets)
    unique = {x.text for x in examples}
    print(f"\n## 1. Same job, all methods: {len(sets)} emotions, {len(examples)} example texts, "
          f"{len(unique)} unique, layers {layers}, mean pooling\n", flush=True)

    peer_emotions = list(sets) if args.peer_emotions == "all" else list(sets)[: int(args.peer_emotions)]
    peer_sets = {e: sets[e] for e in peer_emotions}
    peers = [p for p in ("steering_vectors", "repeng") if p in args.peers]
    missing = {p: peer_available(p) for p in peers}
    for p, why in missing.items():
        if why:
            print(f"  {p}: not run ({why}); install it with the command in benchmarks/README.md", flush=True)
    peers = [p for p in peers if not missing[p]]

    runs: dict[str, list[Measure]] = {}
    naive_dirs = ours_dirs = None
    peer_dirs: dict[str, dict] = {}
    for rep in range(args.repeats):
        # Cold: a fresh cache directory; warm: the same directory again, reopened.
        cache_root = work / f"cache-compare-{rep}"
        with measured("ours, cold cache", runs.setdefault("ours_cold", [])) as m:
            result, engine = run_ours(loaded, layers, sets, cache_root, work / f"out-cold-{rep}",
                                      batch_size=args.batch_size)
            m.texts, m.tokens = result.cache_stats.forwarded, result.cache_stats.tokens
        ours_dirs = read_our_vectors(result)
        with measured("ours, warm cache", runs.setdefault("ours_warm", [])) as m:
            result_w, _ = run_ours(loaded, layers, sets, cache_root, work / f"out-warm-{rep}",
                                   batch_size=args.batch_size)
            m.texts, m.tokens = result_w.cache_stats.forwarded, result_w.cache_stats.tokens
        if rep < args.slow_repeats:
            with measured("naive (seed design)", runs.setdefault("naive", [])) as m:
                naive_dirs, m.texts, m.tokens, padded = run_naive(loaded, layers, sets)
                m.extra["padded_tokens"] = padded
            if len(peer_sets) < len(sets):
                with measured(f"ours, cold, {len(peer_sets)} emotions", runs.setdefault("ours_peerjob", [])) as m:
                    r, _ = run_ours(loaded, layers, peer_sets, work / f"cache-peer-{rep}", work / f"out-p-{rep}",
                                    batch_size=args.batch_size)
                    m.texts, m.tokens = r.cache_stats.forwarded, r.cache_stats.tokens
            for p in peers:
                fn = run_steering_vectors if p == "steering_vectors" else run_repeng
                label = "steering-vectors (train_steering_vector, mean)" if p == "steering_vectors" \
                    else "repeng (ControlVector.train, pca_diff)"
                with measured(label, runs.setdefault(p, [])) as m:
                    peer_dirs[p] = fn(loaded, layers, peer_sets)
                    m.texts, m.tokens = peer_counts(loaded, peer_sets)
        shutil.rmtree(cache_root, ignore_errors=True)

    med = {k: median_measure(v) for k, v in runs.items()}
    base = med["ours_cold"].seconds
    peer_base = med["ours_peerjob"].seconds if "ours_peerjob" in med else base
    rows = []
    for key, m in med.items():
        ref = peer_base if key in ("steering_vectors", "repeng", "ours_peerjob") else base
        job = f"{len(peer_sets)} emotions" if key in ("steering_vectors", "repeng", "ours_peerjob") \
            else f"{len(sets)} emotions"
        rows.append([m.method, job, m.seconds, m.texts, m.tokens, (m.tokens / m.seconds) if m.tokens else None,
                     mib(m.peak_rss), mib(m.rss_delta), f"{m.seconds / ref:.2f}x", m.extra.get("runs")])
    print(format_table(["method", "job", "wall s (median)", "texts forwarded", "tokens", "tokens/s",
                        "peak RSS MiB", "RSS +MiB", "time / ours cold", "runs"], rows))
    speedup = med["naive"].seconds / base if "naive" in med else None
    cos = cosines(ours_dirs, naive_dirs) if naive_dirs is not None else []
    print()
    if speedup is not None:
        print(f"ours (cold) vs naive: {speedup:.1f}x faster end to end; "
              f"{med['naive'].texts / max(med['ours_cold'].texts, 1):.1f}x fewer texts forwarded")
    if cos:
        print(f"cosine(ours, naive) over {len(cos)} emotion x layer vectors: min {min(cos):.6f}, "
              f"mean {float(np.mean(cos)):.6f}")
    peer_cos = {}
    for p, d in peer_dirs.items():
        ours_sub = {e: ours_dirs[e] for e in d}
        c = [abs(x) for x in cosines(ours_sub, d)]
        peer_cos[p] = {"min_abs": min(c), "mean_abs": float(np.mean(c))}
        print(f"|cosine(ours mean-pooled, {p} last-token)|: mean {np.mean(c):.3f} (different pooling and "
              f"pairing: shown for orientation only)")
    for p in peers:
        print(f"{p}: {med[p].seconds / peer_base:.1f}x ours (cold) on the same {len(peer_sets)} emotions")
    report["compare"] = {
        "emotions": len(sets), "example_texts": len(examples), "unique_texts": len(unique), "layers": layers,
        "peer_emotions": peer_emotions,
        "runs": {k: [m.__dict__ for m in v] for k, v in runs.items()},
        "median": {k: m.__dict__ for k, m in med.items()},
        "speedup_vs_naive": speedup,
        "cosine_vs_naive": {"min": min(cos) if cos else None, "mean": float(np.mean(cos)) if cos else None,
                            "n": len(cos)},
        "peer_cosine_abs": peer_cos,
    }


def section_add_emotion(loaded, layers, sets, args, work: Path, report: dict) -> None:
    names = list(sets)
    first, last = {e: sets[e] for e in names[:-1]}, {names[-1]: sets[names[-1]]}
    print(f"\n## 2c. Adding one emotion ({names[-1]!r}) after a full run of the other {len(first)}\n", flush=True)
    rows = []
    res = []
    for rep in range(args.repeats):
        root = work / f"cache-add-{rep}"
        runs: list[Measure] = []
        with measured(f"full run, {len(first)} emotions", runs) as m:
            r, _ = run_ours(loaded, layers, first, root, work / f"out-add-a-{rep}", batch_size=args.batch_size)
            m.texts, m.tokens = r.cache_stats.forwarded, r.cache_stats.tokens
        with measured(f"add {names[-1]!r}", runs) as m:
            r2, _ = run_ours(loaded, layers, last, root, work / f"out-add-b-{rep}", batch_size=args.batch_size)
            m.texts, m.tokens = r2.cache_stats.forwarded, r2.cache_stats.tokens
        res.append(runs)
        shutil.rmtree(root, ignore_errors=True)
    full = median_measure([r[0] for r in res])
    add = median_measure([r[1] for r in res])
    for m in (full, add):
        rows.append([m.method, m.seconds, m.texts, m.tokens,
                     mib(m.rss_delta), f"{100 * m.seconds / full.seconds:.1f}%"])
    print(format_table(["step", "wall s (median)", "texts forwarded", "tokens", "RSS +MiB", "% of full run"], rows))
    report["add_emotion"] = {"emotion": names[-1], "full": full.__dict__, "add": add.__dict__,
                             "fraction": add.seconds / full.seconds}


def section_scale_emotions(loaded, layers, base_nodes, args, work: Path, report: dict) -> None:
    from amygdala_dagster.graph.snapshot import build_snapshot

    counts = [int(x) for x in args.emotion_counts.split(",") if x]
    print(f"\n## 2a. Scaling with the number of emotions (synthetic tags over the {len(base_nodes)} bundled "
          f"texts; ours, cold cache)\n", flush=True)
    rows, out = [], []
    for n in counts:
        nodes, names = synthetic_emotion_nodes(base_nodes, n)
        snap = build_snapshot(nodes)
        t0 = time.perf_counter()
        sets = example_sets_for(snap, names)
        t_select = time.perf_counter() - t0
        naive_texts = len(all_examples(sets))
        runs: list[Measure] = []
        with measured(f"{n} emotions", runs) as m:
            r, _ = run_ours(loaded, layers, sets, work / f"cache-em-{n}", work / f"out-em-{n}",
                            batch_size=args.batch_size)
            m.texts, m.tokens = r.cache_stats.forwarded, r.cache_stats.tokens
        m = runs[0]
        fwd = r.cache_stats.seconds
        rows.append([n, naive_texts, m.texts, m.tokens, t_select, fwd, m.seconds - fwd, m.seconds,
                     mib(m.peak_rss), mib(m.rss_delta)])
        out.append({"emotions": n, "naive_texts": naive_texts, "texts": m.texts, "tokens": m.tokens,
                    "select_s": t_select, "forward_s": fwd, "rest_s": m.seconds - fwd, "total_s": m.seconds,
                    "peak_rss": m.peak_rss, "rss_delta": m.rss_delta})
        shutil.rmtree(work / f"cache-em-{n}", ignore_errors=True)
    print(format_table(["emotions", "texts naive would forward", "texts forwarded", "tokens", "selection s",
                        "forward s", "cache read + train + write s", "total s (excl. selection)",
                        "peak RSS MiB", "RSS +MiB"], rows))
    report["scale_emotions"] = out


def section_scale_nodes(loaded, layers, base_nodes, args, work: Path, report: dict) -> None:
    from amygdala_dagster.graph.snapshot import build_snapshot

    counts = [int(x) for x in args.nodes.split(",") if x]
    if not counts:
        return
    print("\n## 2b. Scaling with the number of nodes (synthetic nodes combining bundled texts; "
          "qualifying emotions, cap 500 examples each; ours, cold cache)\n", flush=True)
    rows, out = [], []
    for n in counts:
        nodes = synthetic_graph(base_nodes, n)
        snap = build_snapshot(nodes)
        t0 = time.perf_counter()
        sets = example_sets_for(snap)
        t_select = time.perf_counter() - t0
        runs: list[Measure] = []
        with measured(f"{n} nodes", runs) as m:
            r, _ = run_ours(loaded, layers, sets, work / f"cache-n-{n}", work / f"out-n-{n}",
                            batch_size=args.batch_size)
            m.texts, m.tokens = r.cache_stats.forwarded, r.cache_stats.tokens
        m = runs[0]
        fwd = r.cache_stats.seconds
        per_mtok = m.seconds / max(m.tokens, 1) * 1e6
        rows.append([n, len(sets), len(all_examples(sets)), m.texts, m.tokens, t_select, fwd, m.seconds,
                     per_mtok, mib(m.peak_rss), mib(m.rss_delta)])
        out.append({"nodes": n, "emotions": len(sets), "example_texts": len(all_examples(sets)),
                    "unique_texts": m.texts, "tokens": m.tokens, "select_s": t_select, "forward_s": fwd,
                    "total_s": m.seconds, "s_per_mtok": per_mtok, "peak_rss": m.peak_rss,
                    "rss_delta": m.rss_delta})
        shutil.rmtree(work / f"cache-n-{n}", ignore_errors=True)
    print(format_table(["nodes", "emotions", "example texts", "unique texts forwarded", "tokens", "selection s",
                        "forward s", "total s (excl. selection)", "s per 1M tokens", "peak RSS MiB",
                        "RSS +MiB"], rows))
    report["scale_nodes"] = out


def length_sorted_batches(tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int,
                          max_batch_tokens: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The engine's batching policy (longest first, one padded length per batch, <= batch_size texts,
    <= max_batch_tokens padded)."""
    from amygdala_dagster.engine.activations import padded_length

    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens, add_special_tokens=True,
                    padding=False)["input_ids"]
    plen = [padded_length(len(x), max_tokens) for x in ids]
    order = sorted(range(len(ids)), key=lambda i: (-plen[i], -len(ids[i]), i))
    batches, pos = [], 0
    while pos < len(order):
        padded = plen[order[pos]]
        size = 1
        while (pos + size < len(order) and size < batch_size and plen[order[pos + size]] == padded
               and (size + 1) * padded <= max_batch_tokens):
            size += 1
        batch = order[pos:pos + size]
        input_ids = torch.full((len(batch), padded), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), padded), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        batches.append((input_ids, mask))
        pos += size
    return batches


def section_engine(loaded, texts: Sequence[str], args, report: dict) -> None:
    from amygdala_dagster.engine.activations import ActivationEngine

    L = loaded.num_layers
    fractions = (1.0, 0.75, 0.5, 0.25)
    layer_for = {f: max(0, math.ceil(f * L) - 1) for f in fractions}
    bs, mbt = args.engine_batch_size, 16384
    engines = {f: ActivationEngine(loaded, [layer_for[f]], pooling="mean", max_tokens=512, batch_size=bs,
                                   max_batch_tokens=mbt) for f in fractions}
    pad_id = engines[1.0]._pad_id
    batches = length_sorted_batches(loaded.tokenizer, texts, engines[1.0].max_tokens, bs, mbt, pad_id)
    real_tokens = sum(int(m.sum()) for _, m in batches)
    print(f"\n## 3. Engine efficiency: {len(texts)} texts, {real_tokens} tokens, {len(batches)} length-sorted "
          f"batches (batch size {bs}, max {mbt} padded tokens)\n", flush=True)
    times: dict[str, list[float]] = {}
    model = loaded.model
    with torch.inference_mode():  # warm-up
        model(input_ids=batches[0][0], attention_mask=batches[0][1])
    def bare_pass() -> None:
        with torch.inference_mode():
            for input_ids, mask in batches:
                model(input_ids=input_ids, attention_mask=mask)

    for rep in range(args.engine_repeats):
        # Alternate the order each round so drift on a shared machine hits both sides alike.
        order = ["bare"] + [f"engine@{f}" for f in fractions]
        for name in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            if name == "bare":
                bare_pass()
            else:
                n = sum(len(idx) for idx, _ in engines[float(name.split("@")[1])].forward(texts))
                assert n == len(texts)
            times.setdefault(name, []).append(time.perf_counter() - t0)
    bare = min(times["bare"])
    rows = [["bare model(input_ids, attention_mask), full depth, pre-tokenised", "-", f"{L}/{L}", bare,
             real_tokens / bare, "1.00x", "-"]]
    out = {"texts": len(texts), "tokens": real_tokens, "batches": len(batches), "bare_s": times["bare"]}
    for f in fractions:
        t = min(times[f"engine@{f}"])
        blocks = layer_for[f] + 1
        rows.append([f"engine (tokenise + batch + hooks + pool), deepest layer at {int(f * 100)}% depth "
                     f"(median ratio {median([b / e for b, e in zip(times['bare'], times[f'engine@{f}'])]):.2f}x)",
                     layer_for[f], f"{blocks}/{L}", t, real_tokens / t, f"{bare / t:.2f}x",
                     f"{100 * (1 - t / bare):.0f}%"])
        out[f"engine_{f}"] = {"layer": layer_for[f], "blocks": blocks, "seconds": times[f"engine@{f}"],
                              "throughput_vs_bare": bare / t}
    print(format_table(["path", "deepest layer", "blocks run", "wall s (best)", "tokens/s", "throughput vs bare",
                        "time saved vs bare"], rows))
    report["engine"] = out


# ============================================================================ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="model (default: the bundled MiniLM)")
    p.add_argument("--layers", default=None, help="target layers (default: the train command's default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine two threads collapse when "
                        "another process takes a core; see RESULTS.md)")
    p.add_argument("--batch-size", type=int, default=4, help="our engine's batch size in the end-to-end runs "
                   "(default 4, the train command's default and the naive method's)")
    p.add_argument("--repeats", type=int, default=3, help="runs of our method per comparison (median)")
    p.add_argument("--slow-repeats", type=int, default=1, help="runs of the naive method and the peers")
    p.add_argument("--peers", default="steering_vectors,repeng", help="peer libraries to run ('' for none)")
    p.add_argument("--peer-emotions", default="4",
                   help="how many emotions the peers train ('all', or N for the first N; ours is then "
                        "also timed on those N so the ratio is for the same job)")
    p.add_argument("--emotions", type=int, default=None,
                   help="restrict the comparison job to the first N qualifying emotions (default: all)")
    p.add_argument("--emotion-counts", default="1,5,14,50,200", help="emotion-scaling points")
    p.add_argument("--nodes", default="1000", help="node-scaling points ('' to skip; 5000 and 20000 are opt-in: "
                   "~6 and ~25 minutes on 2 cores)")
    p.add_argument("--engine-repeats", type=int, default=3)
    p.add_argument("--engine-batch-size", type=int, default=8, help="batch size in the engine section")
    p.add_argument("--sections", default="compare,add,emotions,nodes,engine")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repeat, peers on 2 emotions, emotion counts 1,14,50, nodes 1000 only")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.slow_repeats, args.peer_emotions = 1, 1, "2"
        args.emotion_counts, args.nodes, args.engine_repeats = "1,14,50", "1000", 1
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from amygdala_dagster.engine.layers import parse_layers
    from amygdala_dagster.engine.models import load_model
    from amygdala_dagster.graph.snapshot import build_snapshot
    from amygdala_dagster.workflow.engine_settings import default_target_layers

    t_start = time.perf_counter()
    info = machine_info()
    print("# amygdala-dagster extraction benchmark\n")
    command = [os.path.relpath(__file__, REPO)] + list(sys.argv[1:] if argv is None else argv)
    print("command: python " + " ".join(command))
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        loaded = load_model(args.model, device="cpu", dtype="fp32")
    layers = parse_layers(args.layers, loaded.num_layers) if args.layers else default_target_layers(loaded.num_layers)
    print(f"model: {loaded.model_id} ({type(loaded.model).__name__}, {loaded.num_layers} layers, hidden "
          f"{loaded.hidden_size}, {loaded.dtype}, {sum(p.numel() for p in loaded.model.parameters()):,} params), "
          f"loaded once in {time.perf_counter() - t0:.1f}s (RSS {mib(rss.peak):.0f} MiB); layers {layers}")
    base_nodes = bundled_nodes()
    snap = build_snapshot(base_nodes)
    sets = example_sets_for(snap)
    if args.emotions:
        sets = {e: sets[e] for e in list(sets)[: args.emotions]}
    report: dict[str, Any] = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()},
                              "model": loaded.model_id, "layers": layers}
    sections = set(args.sections.split(","))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="amygdala-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "compare" in sections:
            section_compare(loaded, layers, sets, args, work, report)
        if "add" in sections:
            section_add_emotion(loaded, layers, sets, args, work, report)
        if "emotions" in sections:
            section_scale_emotions(loaded, layers, base_nodes, args, work, report)
        if "nodes" in sections:
            section_scale_nodes(loaded, layers, base_nodes, args, work, report)
        if "engine" in sections:
            texts = sorted({x.text for x in all_examples(sets)})
            section_engine(loaded, texts, args, report)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = time.perf_counter() - t_start
    if hasattr(os, "getloadavg"):
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\ntotal benchmark time {report['total_seconds']:.0f}s; load average at the end "
          f"{report.get('loadavg_end')}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
