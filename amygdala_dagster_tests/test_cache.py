"""The content-addressed activation cache: storage, reopening, damage, and forwarding only what is new."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.shard_store import CacheError

FP = {"model": "synthetic", "layers": [0, 3], "pooling": "mean", "max_tokens": 64}


def _rows(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2, 8)).astype(np.float32)


def test_text_sha256_is_sha256_of_utf8():
    import hashlib

    assert text_sha256("café") == hashlib.sha256("café".encode()).hexdigest()
    assert text_sha256("a") != text_sha256("a ")


def test_add_get_across_shards_and_reopen(tmp_path):
    shas = [f"{i:064x}" for i in range(10)]
    rows = _rows(10)
    cache = ActivationCache(tmp_path, FP, shard_size=4)
    assert cache.missing(shas + shas[:2]) == shas
    cache.add(shas[:6], rows[:6])
    assert len(list(cache.directory.glob("shard-*.safetensors"))) == 1  # 4 written, 2 pending
    np.testing.assert_array_equal(cache.get([shas[5], shas[0]]), rows[[5, 0]])  # pending rows are readable
    cache.add(shas[4:], rows[4:])  # overlap is ignored
    cache.flush()
    shards = sorted(cache.directory.glob("shard-*.safetensors"))
    assert len(shards) == 3 and cache.missing(shas) == []

    reopened = ActivationCache(tmp_path, dict(FP), shard_size=4)
    assert reopened.directory == cache.directory and len(reopened) == 10 and reopened.shape == (2, 8)
    order = [7, 1, 9, 1, 3]
    np.testing.assert_array_equal(reopened.get([shas[i] for i in order]), rows[order])
    chunks = list(reopened.iter_chunks(shas, 3))
    assert [c.shape[0] for c in chunks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), rows)
    with pytest.raises(KeyError, match="f" * 64):
        reopened.get(["f" * 64])

    # shards are plain safetensors: float32 activations + the row shas in the metadata
    with safe_open(str(shards[0]), framework="numpy") as f:
        meta = f.metadata()
        t = f.get_tensor("activations")
    assert t.dtype == np.float32 and t.shape[1:] == (2, 8)
    assert len(json.loads(meta["shas"])) == t.shape[0]
    assert json.loads((cache.directory / "fingerprint.json").read_text()) == FP


def test_other_fingerprint_other_directory_and_tampering_refused(tmp_path):
    a = ActivationCache(tmp_path, FP)
    b = ActivationCache(tmp_path, {**FP, "pooling": "last"})
    assert a.directory != b.directory
    (a.directory / "fingerprint.json").write_text(json.dumps({**FP, "model": "else"}))
    with pytest.raises(CacheError, match="fingerprint differs"):
        ActivationCache(tmp_path, FP)


def test_damaged_shards_and_leftover_temp_files_are_ignored(tmp_path):
    shas = [f"{i:064x}" for i in range(4)]
    cache = ActivationCache(tmp_path, FP, shard_size=2)
    cache.add(shas, _rows(4))
    good = sorted(cache.directory.glob("shard-*.safetensors"))
    # what a kill leaves behind at worst: a temporary file (never a partial shard under its final name)
    (cache.directory / ".shard-dead.safetensors.123.tmp").write_bytes(b"\x00" * 10)
    # and a shard damaged by something else: it only costs a re-forward of its texts
    good[0].write_bytes(good[0].read_bytes()[:50])
    reopened = ActivationCache(tmp_path, FP, shard_size=2)
    assert len(reopened) == 2
    assert len(reopened.missing(shas)) == 2


def test_add_refuses_bad_rows(tmp_path):
    cache = ActivationCache(tmp_path, FP)
    with pytest.raises(ValueError, match="expected"):
        cache.add(["a" * 64], _rows(2))
    bad = _rows(1)
    bad[0, 1, 2] = np.nan
    with pytest.raises(CacheError, match="non-finite"):
        cache.add(["b" * 64], bad)
    cache.add(["c" * 64], _rows(1))
    with pytest.raises(CacheError, match="shape"):
        cache.add(["d" * 64], np.zeros((1, 3, 8), np.float32))


# --------------------------------------------------------------------------- with the real MiniLM


@pytest.fixture(scope="module")
def engine():
    loaded = load_model("minilm", device="cpu")
    return ActivationEngine(loaded, [2, 5], pooling="mean", max_tokens=64, batch_size=4)


TEXTS = [f"Journal entry {i}: the evening was {w} and I wrote about it at length." for i, w in
         enumerate(["calm", "tense", "bright", "grey", "warm", "cold", "slow", "fast"])]


def test_ensure_cached_forwards_each_unique_text_once(engine, tmp_path):
    cache = ActivationCache(tmp_path, engine.fingerprint, shard_size=3)
    texts = TEXTS[:5] + TEXTS[:2]  # duplicates count once
    before = engine.stats.texts
    s1 = ensure_cached(engine, cache, texts, progress=False)
    assert (s1.texts_total, s1.unique_texts, s1.forwarded, s1.cached) == (7, 5, 5, 0)
    assert engine.stats.texts - before == 5 and s1.tokens > 0 and s1.device == "cpu"
    assert len(list(cache.directory.glob("shard-*.safetensors"))) == 2  # 3 + 2, flushed at the end

    # a second run (fresh cache object, as in a new process) forwards nothing
    again = ActivationCache(tmp_path, engine.fingerprint, shard_size=3)
    before = engine.stats.texts
    s2 = ensure_cached(engine, again, texts, progress=False)
    assert (s2.forwarded, s2.cached, s2.tokens) == (0, 5, 0) and engine.stats.texts == before

    # new texts (e.g. a new emotion's examples): only the never-seen ones are forwarded
    s3 = ensure_cached(engine, again, TEXTS, progress=False)
    assert (s3.unique_texts, s3.forwarded, s3.cached) == (8, 3, 5) and engine.stats.texts - before == 3

    # what the cache returns is what the engine computes for those texts
    direct = torch.cat([acts for _, acts in engine.forward(TEXTS[5:8])]).numpy()
    idx = [i for batch, _ in engine.forward(TEXTS[5:8]) for i in batch]
    got = again.get([text_sha256(TEXTS[5 + i]) for i in idx])
    np.testing.assert_allclose(got, direct, atol=1e-6)


def test_ensure_cached_refuses_empty_text_naming_the_key(engine, tmp_path):
    cache = ActivationCache(tmp_path, engine.fingerprint)
    before = engine.stats.texts
    with pytest.raises(ValueError, match=r"example 'node-7 \(joy positive\)': empty text"):
        ensure_cached(engine, cache, ["fine text here", "  \n "], keys=["node-1 (joy positive)",
                                                                      "node-7 (joy positive)"], progress=False)
    assert engine.stats.texts == before and len(cache) == 0


def _flip_bytes_keeping_size(path, start_from_end=400, count=200):
    data = bytearray(path.read_bytes())
    size = len(data)
    for i in range(size - start_from_end, size - start_from_end + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def test_shard_altered_in_place_is_recomputed_not_read(engine, tmp_path, caplog):
    """Issue 9: a shard whose bytes changed without changing its size gave silently wrong vectors."""
    cache = ActivationCache(tmp_path, engine.fingerprint, shard_size=3)
    shas = [text_sha256(t) for t in TEXTS[:6]]
    ensure_cached(engine, cache, TEXTS[:6], progress=False)
    good = cache.get(shas)
    victim = sorted(cache.directory.glob("shard-*.safetensors"))[0]
    _flip_bytes_keeping_size(victim)

    reopened = ActivationCache(tmp_path, engine.fingerprint, shard_size=3)
    before = engine.stats.texts
    with caplog.at_level("WARNING", logger="amygdala_dagster.engine.cache"):
        run = ensure_cached(engine, reopened, TEXTS[:6], progress=False)
    assert run.forwarded == 3 and engine.stats.texts - before == 3
    assert "damaged" in caplog.text and "forwarded again" in caplog.text
    np.testing.assert_allclose(reopened.get(shas), good, atol=1e-6)
    # the damaged file is set aside, so the next open neither indexes nor recomputes it again
    assert list(cache.directory.glob("damaged-shard-*"))
    again = ActivationCache(tmp_path, engine.fingerprint, shard_size=3)
    assert ensure_cached(engine, again, TEXTS[:6], progress=False).forwarded == 0

    # a reader that cannot recompute (no engine) refuses instead of returning wrong rows
    _flip_bytes_keeping_size(sorted(cache.directory.glob("shard-*.safetensors"))[0])
    with pytest.raises(CacheError, match="damaged"):
        ActivationCache(tmp_path, engine.fingerprint, shard_size=3).get(shas)


def test_shard_header_tampering_is_detected(tmp_path):
    """Swapping two row shas in a header (same length) must not relabel rows."""
    shas = [f"{i:064x}" for i in range(2)]
    cache = ActivationCache(tmp_path, FP, shard_size=2)
    cache.add(shas, _rows(2))
    (shard,) = cache.directory.glob("shard-*.safetensors")
    data = shard.read_bytes()
    swapped = data.replace(shas[0].encode(), b"X" * 64).replace(shas[1].encode(), shas[0].encode())
    shard.write_bytes(swapped.replace(b"X" * 64, shas[1].encode()))
    reopened = ActivationCache(tmp_path, FP, shard_size=2)
    assert len(reopened) == 0  # ignored at open: its header does not match its content-addressed name
