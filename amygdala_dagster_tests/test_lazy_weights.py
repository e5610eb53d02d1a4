"""Weight-less model loading: the activation fingerprint without reading the checkpoint, weights on demand.

A run whose texts are all cached must not read the weights (minutes for a 27B
model); these tests pin that the fingerprint computed without them is the one
the loaded model gives, and that the weights are read once, by the first
forward pass that has texts.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from amygdala_dagster.engine.activations import ActivationEngine, FingerprintMismatchError
from amygdala_dagster.engine.models import load_model
from amygdala_dagster_tests.tiny_models import ARCHS, build_tiny_model

TEXTS = ["The old journal entry spoke of warmth and quiet clarity.", "curious",
         "She laughed at the joke, then apologised."]


def _source(arch: str) -> str:
    return "minilm" if arch == "minilm" else build_tiny_model(arch)


def _layers(arch: str) -> list[int]:
    return [3, 5] if arch == "minilm" else [1, 3]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", [*ARCHS, "minilm"])
def test_weightless_fingerprint_equals_the_loaded_models(arch, dtype, weight_reads):
    loads0 = weight_reads.count
    # max_tokens beyond GPT-2's / BERT's / MiniLM's learned positions: the clamp must agree too
    lazy = ActivationEngine(load_model(_source(arch), dtype=dtype, device="cpu", weights=False), _layers(arch),
                            max_tokens=4096)
    assert weight_reads.count == loads0, "building a weight-less engine read the weights"
    assert not lazy.weights_loaded and not lazy.loaded.weights_loaded
    assert all(p.device.type == "meta" for p in lazy.loaded.model.parameters())

    loaded = load_model(_source(arch), dtype=dtype, device="cpu")
    assert weight_reads.count == loads0 + 1 and loaded.weights_loaded
    full = ActivationEngine(loaded, _layers(arch), max_tokens=4096)
    assert lazy.fingerprint == full.fingerprint
    assert lazy.fingerprint_id == full.fingerprint_id
    for name in ("model_id", "revision", "weights_hash", "dtype", "device", "num_layers", "hidden_size", "is_encoder"):
        assert getattr(lazy.loaded, name) == getattr(loaded, name), name


def test_lazy_engine_loads_the_weights_once_on_the_first_forward_with_texts(weight_reads):
    path = build_tiny_model("qwen3_5")
    loaded_cb = []
    lazy = ActivationEngine(load_model(path, device="cpu", weights=False), [1, 3], batch_size=2,
                            on_weights_loaded=loaded_cb.append)
    fingerprint = dict(lazy.fingerprint)
    loads0 = weight_reads.count
    assert list(lazy.forward([])) == []
    with pytest.raises(ValueError, match="empty"):
        lazy.forward(["fine", "   "])
    assert weight_reads.count == loads0 and not lazy.weights_loaded and not loaded_cb

    got = {i: t for idx, acts in lazy.forward(TEXTS) for i, t in zip(idx, acts)}
    assert weight_reads.count == loads0 + 1 and lazy.weights_loaded
    assert len(loaded_cb) == 1 and loaded_cb[0] is lazy.loaded and loaded_cb[0].weights_loaded
    assert lazy.fingerprint == fingerprint
    assert lazy.stats.load_seconds > 0 and lazy.stats.texts == len(TEXTS)
    list(lazy.forward(TEXTS[:1]))
    assert weight_reads.count == loads0 + 1 and len(loaded_cb) == 1  # loaded once, not per call

    full = ActivationEngine(load_model(path, device="cpu"), [1, 3], batch_size=2)
    want = {i: t for idx, acts in full.forward(TEXTS) for i, t in zip(idx, acts)}
    for i in range(len(TEXTS)):
        assert torch.equal(got[i], want[i]), TEXTS[i]


def test_engines_on_one_weightless_model_share_one_weight_load(weight_reads):
    """`amygdala report --sweep-layers` builds two engines on one model: the weights are read once."""
    weightless = load_model(build_tiny_model("llama"), device="cpu", weights=False)
    first, second = ActivationEngine(weightless, [1]), ActivationEngine(weightless, [0, 1, 2, 3])
    loads0 = weight_reads.count
    list(first.forward(TEXTS))
    list(second.forward(TEXTS))
    assert weight_reads.count == loads0 + 1
    assert first.loaded is second.loaded is weightless.with_weights()


def test_checkpoint_changed_after_fingerprinting_refuses_to_forward(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(build_tiny_model("llama"), model_dir)
    lazy = ActivationEngine(load_model(str(model_dir), device="cpu", weights=False), [1, 2])
    # the checkpoint is replaced between fingerprinting and the first forward pass
    weights_file = model_dir / "model.safetensors"
    tensors = load_file(str(weights_file))
    save_file({k: v + 1.0 for k, v in tensors.items()}, str(weights_file), metadata={"format": "pt"})
    for _ in range(2):  # and it keeps refusing: nothing is forwarded under the stale fingerprint
        with pytest.raises(FingerprintMismatchError, match="weights_hash"):
            list(lazy.forward(TEXTS))
    assert lazy.stats.texts == 0 and not lazy.weights_loaded
