"""Finding the block stack of each architecture; layer index parsing and checks."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.layers import (
    LayerResolutionError,
    check_layer_indices,
    parse_layers,
    resolve_layers,
)
from amygdala_dagster.engine.models import load_model
from amygdala_dagster_tests.tiny_models import ARCHS, NUM_LAYERS, build_tiny_model

# Path of the blocks in the base model AutoModel gives, and in the checkpoint's own task class.
EXPECTED = {
    "qwen3_5": ("layers", "Qwen3_5ForCausalLM", "model.layers"),
    "qwen3_5_vl": ("language_model.layers", "Qwen3_5ForConditionalGeneration", "model.language_model.layers"),
    "qwen3": ("layers", "Qwen3ForCausalLM", "model.layers"),
    "qwen2": ("layers", "Qwen2ForCausalLM", "model.layers"),
    "llama": ("layers", "LlamaForCausalLM", "model.layers"),
    "mistral": ("layers", "MistralForCausalLM", "model.layers"),
    "gemma": ("layers", "GemmaForCausalLM", "model.layers"),
    "gpt2": ("h", "GPT2LMHeadModel", "transformer.h"),
    "gpt_neox": ("layers", "GPTNeoXForCausalLM", "gpt_neox.layers"),
    "bert": ("encoder.layer", "BertForMaskedLM", "bert.encoder.layer"),
}


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_resolves_blocks_of_base_model(arch):
    loaded = load_model(build_tiny_model(arch))
    resolved = resolve_layers(loaded.model, loaded.num_layers)
    assert resolved.path == EXPECTED[arch][0]
    assert len(resolved.modules) == NUM_LAYERS
    blocks = _get(loaded.model, resolved.path)
    assert all(a is b for a, b in zip(resolved.modules, blocks))


@pytest.mark.parametrize("arch", ARCHS)
def test_resolves_blocks_of_task_class(arch):
    cls = getattr(transformers, EXPECTED[arch][1])
    model = cls.from_pretrained(build_tiny_model(arch), local_files_only=True)
    resolved = resolve_layers(model, NUM_LAYERS)
    assert resolved.path == EXPECTED[arch][2]
    assert all(a is b for a, b in zip(resolved.modules, _get(model, resolved.path)))


class _Odd(nn.Module):
    """A module tree no known path matches: blocks under ``trunk.stack``."""

    def __init__(self, n: int = 4):
        super().__init__()
        self.trunk = nn.Module()
        self.trunk.stack = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n - 1))  # wrong length: not the blocks


def test_unknown_tree_error_lists_every_path_tried():
    with pytest.raises(LayerResolutionError) as err:
        resolve_layers(_Odd(), 4)
    msg = str(err.value)
    for path in ("layers", "model.layers", "language_model.layers", "transformer.h", "gpt_neox.layers",
                 "encoder.layer", "model.decoder.layers"):
        assert f"{path} (" in msg
    assert "ModuleList of length 3, expected 4" in msg
    assert "--layer-path" in msg


def test_override_path_is_used():
    model = _Odd()
    resolved = resolve_layers(model, 4, override="trunk.stack")
    assert resolved.path == "trunk.stack"
    assert all(a is b for a, b in zip(resolved.modules, model.trunk.stack))


def test_override_on_real_model_and_bad_override():
    loaded = load_model(build_tiny_model("llama"))
    assert resolve_layers(loaded.model, NUM_LAYERS, override="layers").path == "layers"
    with pytest.raises(LayerResolutionError, match="'model.layers'.*not found"):
        resolve_layers(loaded.model, NUM_LAYERS, override="model.layers")
    with pytest.raises(LayerResolutionError, match="not a ModuleList"):
        resolve_layers(loaded.model, NUM_LAYERS, override="norm")


def test_engine_uses_layer_path_override():
    loaded = load_model(build_tiny_model("gpt2"))
    engine = ActivationEngine(loaded, [1], layer_path="h")
    assert engine.resolved_layer_path == "h"
    assert engine.fingerprint["layer_path"] == "h"
    with pytest.raises(LayerResolutionError):
        ActivationEngine(loaded, [1], layer_path="transformer.h")


def test_parse_layers():
    assert parse_layers("3,18,33,36") == [3, 18, 33, 36]
    assert parse_layers(" 3, 18 ") == [3, 18]
    assert parse_layers("-1,-4,0", num_layers=4) == [3, 0, 0]
    with pytest.raises(ValueError, match="depth"):
        parse_layers("-1")
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("-5", num_layers=4)
    with pytest.raises(ValueError, match="'x'"):
        parse_layers("3,x")
    with pytest.raises(ValueError, match="empty"):
        parse_layers("3,,4")
    with pytest.raises(ValueError):
        parse_layers("")


def test_check_layer_indices_names_the_depth():
    with pytest.raises(ValueError) as err:
        check_layer_indices([3, 64], 64, "Qwen/Qwen3.5-27B")
    assert str(err.value) == "layer 64 out of range: Qwen/Qwen3.5-27B has 64 layers (0..63)"
    with pytest.raises(ValueError, match="layer -1 out of range"):
        check_layer_indices([-1], 64, "m")
    with pytest.raises(ValueError, match="layer 3 given twice"):
        check_layer_indices([3, 5, 3], 64, "m")
    with pytest.raises(ValueError, match="no layers"):
        check_layer_indices([], 64, "m")
    assert check_layer_indices([torch.tensor(2).item(), 0], 4) == [2, 0]


def test_engine_rejects_out_of_range_layer_up_front():
    loaded = load_model(build_tiny_model("qwen3_5"))
    with pytest.raises(ValueError, match=r"layer 4 out of range: .*tiny-qwen3_5 has 4 layers \(0\.\.3\)"):
        ActivationEngine(loaded, [1, 4])
