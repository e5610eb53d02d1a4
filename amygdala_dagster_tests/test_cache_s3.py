"""The activation cache on an object store: a real S3-compatible server (moto) on 127.0.0.1, via s3fs."""

from __future__ import annotations

import numpy as np
import pytest

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache, text_sha256
from amygdala_dagster.engine.forward import ensure_cached
from amygdala_dagster.engine.models import load_model
from amygdala_dagster.engine.shards import EngineSpec, run_shards_locally
from amygdala_dagster.workflow.engine_settings import EngineSettings
from amygdala_dagster_tests.conftest import free_port
from amygdala_dagster_tests.tiny_models import build_tiny_model

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

TEXTS = [f"Journal entry {i}: the evening was {w} and I wrote about it at length." for i, w in
         enumerate(["calm", "tense", "bright", "grey", "warm", "cold", "slow", "fast", "quiet", "loud"])]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free loopback port and the standard AWS variables pointing at it."""
    import fsspec

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("amygdala-test")
    try:
        yield fs
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
        mp.undo()
        server.stop()


@pytest.fixture(scope="module")
def engine():
    return ActivationEngine(load_model("minilm", device="cpu"), [2, 5], max_tokens=64, batch_size=4)


def test_cache_dir_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("AMYGDALA_CACHE_DIR", "s3://bucket/cache")
    assert EngineSettings().cache_root() == "s3://bucket/cache"
    monkeypatch.setenv("AMYGDALA_CACHE_DIR", "file:///tmp/x")
    assert str(EngineSettings().cache_root()) == "/tmp/x"


def test_cache_on_s3_matches_a_local_cache_and_is_reused(s3_env, engine, tmp_path):
    url = "s3://amygdala-test/cache-a"
    cache = ActivationCache(url, engine.fingerprint, shard_size=4)
    assert cache.directory == f"s3://amygdala-test/cache-a/{cache.fingerprint_id}"
    run = ensure_cached(engine, cache, TEXTS + TEXTS[:3], progress=False)
    assert (run.unique_texts, run.forwarded) == (10, 10)
    names = [p.rsplit("/", 1)[-1] for p in s3_env.ls(f"amygdala-test/cache-a/{cache.fingerprint_id}")]
    assert sorted(n for n in names if n.startswith("shard-")) and "fingerprint.json" in names

    local = ActivationCache(tmp_path, engine.fingerprint, shard_size=4)
    ensure_cached(engine, local, TEXTS, progress=False)
    shas = [text_sha256(t) for t in TEXTS]

    again = ActivationCache(url, engine.fingerprint)  # as a new process would open it
    before = engine.stats.texts
    assert ensure_cached(engine, again, TEXTS, progress=False).forwarded == 0 and engine.stats.texts == before
    assert again.get(shas).tobytes() == local.get(shas).tobytes()
    chunks = list(again.iter_chunks(shas[::-1], 3))
    np.testing.assert_array_equal(np.concatenate(chunks), local.get(shas[::-1]))


def test_damaged_object_is_set_aside_and_recomputed(s3_env, engine, caplog):
    url = "s3://amygdala-test/cache-b"
    cache = ActivationCache(url, engine.fingerprint, shard_size=5)
    ensure_cached(engine, cache, TEXTS, progress=False)
    good = cache.get([text_sha256(t) for t in TEXTS])
    prefix = f"amygdala-test/cache-b/{cache.fingerprint_id}"
    victim = sorted(p for p in s3_env.ls(prefix) if p.rsplit("/", 1)[-1].startswith("shard-"))[0]
    data = bytearray(s3_env.cat_file(victim))
    data[-100] ^= 0xFF
    s3_env.pipe_file(victim, bytes(data))

    reopened = ActivationCache(url, engine.fingerprint, shard_size=5)
    with caplog.at_level("WARNING", logger="amygdala_dagster.engine.cache"):
        run = ensure_cached(engine, reopened, TEXTS, progress=False)
    assert run.forwarded == 5 and "damaged" in caplog.text
    np.testing.assert_allclose(reopened.get([text_sha256(t) for t in TEXTS]), good, atol=1e-6)
    s3_env.invalidate_cache(prefix)
    assert any(p.rsplit("/", 1)[-1].startswith("damaged-shard-") for p in s3_env.ls(prefix))


@pytest.mark.slow
def test_two_shard_processes_write_one_bucket_at_once(s3_env, tmp_path):
    spec = EngineSpec(model=build_tiny_model("qwen3"), layers=[1, 3], dtype="fp32", device="cpu",
                      max_tokens=64, batch_size=4)
    texts = [f"{t} ({k})" for k in range(4) for t in TEXTS]
    url = "s3://amygdala-test/cache-shards"
    results = run_shards_locally(spec, url, texts, 2, threads=2, cache_shard_size=3, timeout_s=300)
    assert sum(r.stats.forwarded for r in results) == len(texts)
    engine = spec.build()
    shas = [text_sha256(t) for t in texts]
    remote = ActivationCache(url, engine.fingerprint)
    assert remote.missing(shas) == []
    local = ActivationCache(tmp_path, engine.fingerprint)
    ensure_cached(engine, local, texts, progress=False)
    assert remote.get(shas).tobytes() == local.get(shas).tobytes()
