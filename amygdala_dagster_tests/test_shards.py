"""Shards: the forward work split by text hash, real processes filling one cache at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.shards import (
    EngineSpec,
    ShardError,
    forward_shard,
    run_shards_locally,
    shard_of,
    shard_texts,
)
from amygdala_dagster_tests.tiny_models import build_tiny_model

WORDS = ("calm", "tense", "bright", "grey", "warm", "cold", "slow", "fast", "quiet", "loud")
TEXTS = [f"Journal entry {i}: the evening was {WORDS[i % 10]} and {WORDS[(i * 7) % 10]}; "
         + "I wrote about it at length. " * (1 + i % 5) for i in range(48)]


@pytest.fixture(scope="module")
def spec():
    return EngineSpec(model=build_tiny_model("qwen3"), layers=[1, 3], dtype="fp32", device="cpu",
                      max_tokens=64, batch_size=4)


def test_shard_of_is_a_deterministic_balanced_partition():
    shas = [text_sha256(f"text {i}") for i in range(4000)]
    for n in (1, 2, 3, 8):
        counts = Counter(shard_of(s, n) for s in shas)
        assert set(counts) == set(range(n))
        assert max(counts.values()) - min(counts.values()) < 4000 / n * 0.15
        assert [shard_of(s, n) for s in shas[:50]] == [int(s[:16], 16) % n for s in shas[:50]]
    with pytest.raises(ValueError, match="at least 1"):
        shard_of(shas[0], 0)
    texts = TEXTS + TEXTS[:5]  # duplicates belong to one shard, once
    parts = [shard_texts(texts, i, 3) for i in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(TEXTS)))
    with pytest.raises(ValueError, match="out of range"):
        shard_texts(texts, 3, 3)


def test_two_caches_on_one_directory_see_each_others_shards(tmp_path):
    fp = {"model": "synthetic", "layers": [0]}
    a = ActivationCache(tmp_path, fp, shard_size=2)
    b = ActivationCache(tmp_path, fp, shard_size=2)
    rows = np.arange(4 * 3, dtype=np.float32).reshape(4, 1, 3)
    a.add(["a" * 64, "b" * 64], rows[:2])
    b.add(["c" * 64, "d" * 64], rows[2:])
    assert "c" * 64 not in a and a.refresh() == 1 and "c" * 64 in a
    assert b.refresh() == 1
    np.testing.assert_array_equal(b.get(["a" * 64, "d" * 64]), rows[[0, 3]])
    assert len(list(a.directory.glob("shard-*.safetensors"))) == 2  # distinct content-addressed names


@pytest.mark.slow
def test_two_shard_processes_fill_one_cache_with_the_bytes_of_one_process(spec, tmp_path):
    """Issue 12 §3: every unique text forwarded once across shards; byte-identical to N = 1."""
    texts = TEXTS + TEXTS[::3]
    engine = spec.build()
    one = forward_shard(engine, tmp_path / "n1", texts, index=0, n=1, progress=False, cache_shard_size=5)
    assert (one.shard_texts, one.stats.forwarded) == (len(TEXTS), len(TEXTS))

    results = run_shards_locally(spec, tmp_path / "n2", texts, 2, threads=2, cache_shard_size=5, timeout_s=300)
    assert [r.index for r in results] == [0, 1] and len({r.pid for r in results}) == 2
    assert sum(r.stats.forwarded for r in results) == len(TEXTS)
    assert all(r.stats.forwarded == r.shard_texts > 0 for r in results)

    shas = [text_sha256(t) for t in TEXTS]
    n1 = ActivationCache(tmp_path / "n1", engine.fingerprint)
    n2 = ActivationCache(tmp_path / "n2", engine.fingerprint)
    assert n2.missing(shas) == []
    assert n1.get(shas).tobytes() == n2.get(shas).tobytes()
    # a third run of both shards forwards nothing
    again = run_shards_locally(spec, tmp_path / "n2", texts, 2, threads=2, timeout_s=300)
    assert [r.stats.forwarded for r in again] == [0, 0]


@pytest.mark.slow
def test_a_shard_killed_mid_way_resumes_from_the_cache(spec, tmp_path):
    texts = [f"{t} (copy {k})" for k in range(20) for t in TEXTS]  # enough work to be killed in the middle
    one_spec = EngineSpec(**{**json.loads(spec.to_json()), "batch_size": 1})
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")
    cmd = [sys.executable, "-m", "amygdala_dagster.engine.shards", "--spec", one_spec.to_json(), "--texts",
           str(texts_file), "--index", "1", "--shards", "2", "--cache-dir", str(tmp_path / "c"),
           "--threads", "1", "--cache-shard-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    engine = spec.build()  # batches of 4 here: the bytes do not depend on the batching
    directory = tmp_path / "c" / ActivationCache(tmp_path / "probe", engine.fingerprint).fingerprint_id
    deadline = time.monotonic() + 120
    try:
        while not list(directory.glob("shard-*.safetensors")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the shard process ended before it could be killed"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    mine = shard_texts(texts, 1, 2)
    written = len(ActivationCache(tmp_path / "c", engine.fingerprint))
    assert 0 < written < len(mine)

    resumed = forward_shard(engine, tmp_path / "c", texts, index=1, n=2, progress=False, cache_shard_size=4)
    assert resumed.stats.forwarded == len(mine) - written and resumed.stats.cached == written
    # the resumed cache holds exactly what one uninterrupted process computes
    fresh = ActivationCache(tmp_path / "fresh", engine.fingerprint)
    ensure_cached(engine, fresh, [texts[i] for i in mine], progress=False)
    shas = [text_sha256(texts[i]) for i in mine]
    assert ActivationCache(tmp_path / "c", engine.fingerprint).get(shas).tobytes() == fresh.get(shas).tobytes()


def test_a_failing_shard_process_is_named(tmp_path):
    bad = EngineSpec(model=str(tmp_path / "no-such-model"), layers=[0], device="cpu")
    with pytest.raises(ShardError, match=r"shard 0/1 exited with 1:(.|\n)*no such checkpoint"):
        run_shards_locally(bad, tmp_path / "c", ["some text"], 1, threads=1, timeout_s=120)
