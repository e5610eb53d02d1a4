"""The forward work split into N shards by text content hash, all filling one activation cache.

A unique text belongs to shard ``shard_of(text_sha256(text), n)``: a pure
function of its content, so every text is forwarded by exactly one of the N
shards, whatever process, pod or machine runs them. :func:`forward_shard`
forwards the uncached texts of one shard into the shared
:class:`~amygdala_dagster.engine.cache.ActivationCache` (content-addressed, immutable
shard files: concurrent writers never clobber each other); once every shard
has finished, the per-emotion statistics are read from the cache as with one
process. A shard killed mid-way resumes from the cache shards it already
wrote. Because a text's padded length depends on the text alone
(:func:`~amygdala_dagster.engine.activations.padded_length`), the cached activations
-- and so the vectors -- are the same bytes for any number of shards (on CPU;
on GPUs as far as the kernels are batch-size invariant).

:func:`run_shards_locally` runs N shards as N local processes (the torch
threads split between them, one GPU each when there are enough), for
benchmarks and single-box runs; an orchestrator (Dagster's multiprocess or
Kubernetes executor) calls :func:`forward_shard` from each of its steps
instead. Processes exchange JSON only (settings, texts, results): no pickle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import DEFAULT_SHARD_SIZE, ActivationCache, text_sha256
from amygdala_dagster.engine.forward import CacheRunStats, TokenSequence, ensure_cached
from amygdala_dagster.engine.layers import parse_layers
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.token_cache import TokenCache

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard process failed; the message names the shard and ends with its last output lines."""


def shard_of(sha: str, n: int) -> int:
    """The shard (``0..n-1``) of the text whose SHA-256 hex digest is ``sha``: its first 64 bits modulo ``n``."""
    if int(n) < 1:
        raise ValueError(f"number of shards must be at least 1, got {n}")
    return int(sha[:16], 16) % int(n)


def _check_index(index: int, n: int) -> None:
    if int(n) < 1:
        raise ValueError(f"number of shards must be at least 1, got {n}")
    if not 0 <= int(index) < int(n):
        raise ValueError(f"shard index {index} out of range for {n} shard(s) (0..{int(n) - 1})")


def shard_texts(texts: Sequence[str], index: int, n: int) -> list[int]:
    """Positions in ``texts`` of the distinct texts of shard ``index`` of ``n`` (first occurrence of each)."""
    _check_index(index, n)
    seen: set[str] = set()
    out = []
    for i, text in enumerate(texts):
        sha = text_sha256(text)
        if sha in seen:
            continue
        seen.add(sha)
        if shard_of(sha, n) == index:
            out.append(i)
    return out


@dataclass
class EngineSpec:
    """What an engine is built from, as plain JSON-able values (sent to shard processes).

    ``layers``: indices (negative count from the end) or a ``"3,18,33"`` list.
    ``batch_size`` None batches by the token budget alone (see
    :class:`~amygdala_dagster.engine.activations.ActivationEngine`). ``device_map``
    spreads one model over several devices (see
    :func:`~amygdala_dagster.engine.models.load_model`).
    """

    model: str
    layers: list[int] | str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    pooling: str = "mean"
    max_tokens: int = 512
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    layer_path: str | None = None
    trust_remote_code: bool = False
    device_map: str | Mapping[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineSpec:
        return cls(**json.loads(text))

    def build(self) -> ActivationEngine:
        """The engine, built without reading the weights (its first forward pass with texts loads them)."""
        extra = {"device_map": self.device_map} if self.device_map is not None else {}
        loaded = load_model(self.model, dtype=self.dtype, device=self.device, revision=self.revision,
                            trust_remote_code=self.trust_remote_code, weights=False, **extra)
        if isinstance(self.layers, str):
            layers = parse_layers(self.layers, loaded.num_layers)
        else:
            layers = [int(x) + loaded.num_layers if int(x) < 0 else int(x) for x in self.layers]
        kwargs: dict[str, Any] = {}
        if self.batch_size is not None:
            kwargs["batch_size"] = int(self.batch_size)
        if self.max_batch_tokens is not None:
            kwargs["max_batch_tokens"] = int(self.max_batch_tokens)
        return ActivationEngine(loaded, layers, pooling=self.pooling, max_tokens=int(self.max_tokens),
                                layer_path=self.layer_path, **kwargs)


@dataclass
class ShardResult:
    """What one shard did: its place, its share of the unique texts, and the cache run's counters."""

    index: int
    shards: int
    shard_texts: int
    stats: CacheRunStats
    pid: int = field(default_factory=os.getpid)
    started_at: float = 0.0
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stats"] = self.stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardResult:
        data = dict(data)
        data["stats"] = CacheRunStats(**data["stats"])
        return cls(**data)


def forward_shard(
    engine: ActivationEngine,
    cache_root: str | os.PathLike[str],
    texts: Sequence[str],
    *,
    index: int,
    n: int,
    keys: Sequence[str] | None = None,
    sequences: Sequence[TokenSequence] = (),
    progress: bool = True,
    cache_shard_size: int = DEFAULT_SHARD_SIZE,
) -> ShardResult:
    """Forward the uncached inputs of shard ``index`` of ``n`` into the caches under ``cache_root``.

    ``texts`` is the whole run's list (duplicates allowed); only the distinct
    texts whose hash falls in this shard are looked at, and of those only
    the ones the cache lacks are forwarded (a shard killed earlier resumes).
    The per-token ``sequences`` are split the same way (a plain text's by its
    text hash, so its pooled row and its per-token activations stay in one
    shard and one forward). ``n == 1`` is the unsharded run. The caller reads
    the statistics from the cache once every shard is done.
    """
    _check_index(index, n)
    if keys is not None and len(keys) != len(texts):
        raise ValueError(f"forward_shard: {len(keys)} keys for {len(texts)} texts")
    started = time.time()
    mine = shard_texts(texts, index, n)
    my_sequences = [s for s in sequences if shard_of(s.text_sha or s.key, n) == index]
    tokens = TokenCache(cache_root, engine.fingerprint, engine.loaded.dtype)
    with ActivationCache(cache_root, engine.fingerprint, shard_size=cache_shard_size) as cache:
        stats = ensure_cached(engine, cache, [texts[i] for i in mine],
                              keys=[keys[i] for i in mine] if keys is not None else None, progress=progress,
                              tokens=tokens, sequences=my_sequences)
    return ShardResult(index=int(index), shards=int(n), shard_texts=len(mine), stats=stats,
                       started_at=started, finished_at=time.time())


def _gpu_count() -> int:
    try:
        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no CUDA runtime: no GPUs
        return 0


def run_shards_locally(
    spec: EngineSpec,
    cache_root: str | os.PathLike[str],
    texts: Sequence[str],
    n: int,
    *,
    threads: int | None = None,
    gpus: Sequence[str] | None = None,
    cache_shard_size: int = DEFAULT_SHARD_SIZE,
    timeout_s: float | None = None,
    python: str = sys.executable,
) -> list[ShardResult]:
    """Run shards ``0..n-1`` as ``n`` processes at once, each loading the model once; return their results.

    ``threads`` (default: all CPUs) is split between the processes (at least
    one torch thread each). On CUDA each process sees one GPU of ``gpus``
    (default: the visible GPUs, when there are at least ``n``). Raises
    :class:`ShardError` naming the shards that failed (after every process
    has ended: what the others wrote stays in the cache).
    """
    _check_index(0, n)
    total = int(threads or os.cpu_count() or 1)
    per_shard = max(1, total // int(n))
    if gpus is None and spec.device in ("auto", "cuda") and spec.device_map is None:
        count = _gpu_count()
        gpus = [str(i) for i in range(count)] if count >= n > 1 else None
    unique = list(dict.fromkeys(texts))
    cache_arg = os.fspath(cache_root)
    with tempfile.TemporaryDirectory(prefix="amygdala-shards-") as tmp:
        texts_file = Path(tmp) / "texts.jsonl"
        texts_file.write_text("".join(json.dumps(t) + "\n" for t in unique), encoding="utf-8")
        procs = []
        for i in range(int(n)):
            env = dict(os.environ, OMP_NUM_THREADS=str(per_shard), MKL_NUM_THREADS=str(per_shard))
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(gpus[i % len(gpus)])
            result = Path(tmp) / f"result-{i}.json"
            out = open(Path(tmp) / f"log-{i}.txt", "wb")  # noqa: SIM115 - closed below
            cmd = [python, "-m", "amygdala_dagster.engine.shards", "--spec", spec.to_json(), "--texts", str(texts_file),
                   "--index", str(i), "--shards", str(n), "--cache-dir", cache_arg, "--threads", str(per_shard),
                   "--cache-shard-size", str(cache_shard_size), "--result", str(result)]
            procs.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), out, result))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        failed = []
        for i, proc, out, _ in procs:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            out.close()
            if proc.returncode != 0:
                tail = (Path(tmp) / f"log-{i}.txt").read_text(encoding="utf-8", errors="replace")[-2000:]
                failed.append(f"shard {i}/{n} exited with {proc.returncode}:\n{tail}")
        if failed:
            raise ShardError("\n".join(failed))
        return [ShardResult.from_dict(json.loads(result.read_text(encoding="utf-8"))) for *_, result in procs]


def main(argv: Sequence[str] | None = None) -> int:
    """One shard process of :func:`run_shards_locally` (arguments are JSON and files, never pickles)."""
    p = argparse.ArgumentParser(prog="python -m amygdala_dagster.engine.shards",
                                description="Forward one shard's texts into the activation cache.")
    p.add_argument("--spec", required=True, help="EngineSpec as JSON")
    p.add_argument("--texts", required=True, type=Path, help="JSONL file, one JSON string per line")
    p.add_argument("--index", required=True, type=int)
    p.add_argument("--shards", required=True, type=int)
    p.add_argument("--cache-dir", required=True, help="cache root: a directory or an fsspec URL")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    p.add_argument("--cache-shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--result", type=Path, default=None, help="write the ShardResult here as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(int(args.threads))
    texts = [json.loads(line) for line in args.texts.read_text(encoding="utf-8").splitlines() if line]
    engine = EngineSpec.from_json(args.spec).build()
    result = forward_shard(engine, args.cache_dir, texts, index=args.index, n=args.shards, progress=False,
                           cache_shard_size=args.cache_shard_size)
    if args.result is not None:
        args.result.write_text(json.dumps(result.to_dict()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
