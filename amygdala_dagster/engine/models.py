"""Loading the model whose residual stream we read: offline first, base model only.

:func:`load_model` returns a :class:`LoadedModel` with the model in eval mode on
its device, its tokenizer, and the facts the rest of the project records about
it (id, revision, a cheap weights fingerprint, dtype, depth, width).

We load with ``AutoModel``: the base model without its LM head (we never need
the head). A checkpoint saved from ``*ForCausalLM`` loads into the base class
with only the head reported as unused; for Qwen3.5's multimodal checkpoint
``AutoModel`` gives the wrapper whose text decoder sits under
``language_model``. When ``AutoModel`` would leave decoder weights
uninitialised we fall back to the checkpoint's own task class and take its
base model.

``load_model(..., weights=False)`` stops short of the weights: config,
tokenizer, weights fingerprint and a structural skeleton of the model (the
same module tree, built on the ``meta`` device) are enough to compute an
activation fingerprint and resolve layers, so a run whose activations are all
cached never pays for reading a large checkpoint. :meth:`LoadedModel.with_weights`
loads the real model (once) when a text actually has to be forwarded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from amygdala_dagster.engine.checkpoints import (
    BUNDLED_MODEL_IDS,
    ModelLoadError,
    hub_offline,
    resolve_model_path,
    snapshot_dir,
    weights_fingerprint,
)
from amygdala_dagster.engine.placement import map_device, map_offloads_to_disk, offload_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Encoder-only families: bidirectional attention, no causal decoder.
_ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "albert", "electra",
    "deberta", "deberta-v2", "mpnet", "camembert", "ernie", "modernbert", "nomic_bert",
    "megatron-bert", "mobilebert", "squeezebert", "luke", "xlm", "flaubert", "funnel",
    "rembert", "roformer", "nezha", "data2vec-text", "ibert", "esm",
})

_WEIGHTS_LOCK = threading.RLock()  # re-entered: with_weights() -> load_model()


@dataclass
class LoadedModel:
    """A model ready for activation capture plus what we record about it.

    With ``weights_loaded`` False (``load_model(..., weights=False)``) ``model``
    is a skeleton on the ``meta`` device: the module tree of the real model,
    without parameters' data. Every other field is what the loaded model has;
    :meth:`with_weights` gives the loaded one.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    revision: str | None
    weights_hash: str | None
    dtype: str
    device: str
    num_layers: int
    hidden_size: int
    is_encoder: bool
    text_config: PretrainedConfig
    weights_loaded: bool = True
    #: Where each module was placed when loaded with a device map (``hf_device_map``), else None.
    device_map: dict[str, str] | None = None
    #: The ``load_model`` arguments, so the weights can be loaded later the same way.
    load_args: dict[str, Any] | None = field(default=None, repr=False)
    _with_weights: LoadedModel | None = field(default=None, repr=False, compare=False)

    def with_weights(self) -> LoadedModel:
        """This model with its weights loaded: ``self`` when they are, else loaded now (once per object)."""
        if self.weights_loaded:
            return self
        with _WEIGHTS_LOCK:
            if self._with_weights is None:
                if self.load_args is None:
                    raise ModelLoadError(f"model {self.model_id!r}: no load arguments recorded to load its weights")
                self._with_weights = load_model(**self.load_args, weights=True)
            return self._with_weights


def parse_dtype(dtype: str, device: str) -> torch.dtype:
    """Map a dtype flag (auto, bf16, fp16, fp32 and long names) to a torch dtype for ``device``."""
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of auto, bf16, bfloat16, fp16, float16, fp32, float32"
        )
    resolved = _DTYPES[key]
    if resolved is None:
        resolved = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return resolved


def resolve_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device is checked for availability."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' requested but MPS is not available")
    return device


def _is_encoder(config: PretrainedConfig) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "model_type", None) in _ENCODER_MODEL_TYPES:
        return True
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (it lists the unused LM head as UNEXPECTED, which is by design
    here; missing decoder weights are checked and reported by us) and its per-tensor progress bar,
    which would interleave with the forward pass's own."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # unannotated in transformers
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bar:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _load_weights(source: str, config: PretrainedConfig, common: dict[str, Any], torch_dtype: torch.dtype,
                  device: str, device_map: str | Mapping[str, Any] | None = None) -> torch.nn.Module:
    from transformers import AutoModel

    load_kwargs: dict[str, Any] = dict(common, config=config, dtype=torch_dtype)
    placed = False
    if device_map is not None:
        # One model over several devices (accelerate places the blocks and moves activations between them).
        if importlib.util.find_spec("accelerate") is None:
            raise ModelLoadError(f"{source}: device_map needs the accelerate package (pip install -e '.[gpu]' "
                                 f"or pip install accelerate)")
        load_kwargs["device_map"] = device_map
        if map_offloads_to_disk(device_map):
            load_kwargs["offload_folder"] = offload_folder()
        model, info = AutoModel.from_pretrained(source, output_loading_info=True, **load_kwargs)
        placed = True
        device = "cpu"  # the model is placed: never move it as a whole below
    elif device != "cpu":
        # Load straight onto the accelerator: a 27B checkpoint need not fit in host RAM.
        try:
            model, info = AutoModel.from_pretrained(source, device_map={"": device},
                                                    output_loading_info=True, **load_kwargs)
            placed = True
        except (ImportError, ValueError) as exc:
            if "accelerate" not in str(exc).lower():
                raise
            log.info("loading %s on cpu first (device_map needs accelerate): %s", source, exc)
    if not placed:
        model, info = AutoModel.from_pretrained(source, output_loading_info=True, **load_kwargs)
        if device != "cpu":
            model = model.to(device)

    missing = [k for k in (info.get("missing_keys") or []) if ".layers." in f".{k}" or ".layer." in f".{k}"
               or ".h." in f".{k}"]
    if missing:
        # The base class did not pick up decoder weights: use the checkpoint's own class.
        log.warning("%s: AutoModel left %d decoder weights uninitialised (e.g. %s); loading %s instead",
                    source, len(missing), missing[0], (config.architectures or ["?"])[0])
        model = _load_task_model(source, config, load_kwargs, device)
    return cast(torch.nn.Module, model)


def _load_task_model(
    source: str, config: PretrainedConfig, load_kwargs: dict[str, Any], device: str
) -> torch.nn.Module:
    import transformers

    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        model = cls.from_pretrained(source, **load_kwargs)
        base: torch.nn.Module = getattr(model, "base_model", model)
        return base.to(device) if device != "cpu" else base
    raise ModelLoadError(f"{source}: AutoModel left decoder weights uninitialised and the checkpoint's "
                         f"architectures {archs} are not available in transformers")


def _skeleton(config: PretrainedConfig, torch_dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """The module tree ``AutoModel`` loads for ``config``, on the meta device (no memory, no weights read)."""
    from transformers import AutoModel

    with torch.device("meta"):
        skeleton: torch.nn.Module = AutoModel.from_config(  # type: ignore[no-untyped-call]  # unannotated in transformers
            config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        return skeleton


def _expected_device(device: str) -> str:
    """How a parameter placed on ``device`` reports its device (``cuda`` -> ``cuda:0``)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type == "mps" and dev.index is None:
        dev = torch.device("mps", 0)
    return str(dev)


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto", revision: str | None = None,
               trust_remote_code: bool = False, weights: bool = True,
               device_map: str | Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a base model and its tokenizer for activation capture.

    ``name_or_path`` is a bundled short name (``minilm``), a local checkpoint
    directory or a hub id. Local directories and bundled models never touch
    the network. A hub id is first looked up in the local cache; the network
    is only used when that fails and ``HF_HUB_OFFLINE`` is not set.

    ``weights=False`` reads everything but the weights and gives a
    :class:`LoadedModel` whose ``model`` is a meta-device skeleton (see
    :meth:`LoadedModel.with_weights`). A hub checkpoint whose weight files are
    not downloaded yet cannot be fingerprinted without them, so it is loaded
    whole even then.

    ``device_map`` (needs ``accelerate``) spreads a model too large for one
    device over several: ``"auto"`` (the GPUs of the box, then CPU), or a dict
    of module names to devices (``{"layers.0": 0, ..., "norm": 1}``, ``"cpu"``,
    ``"disk"``) as Hugging Face takes it; ``device`` is then not used. The
    engine's hooks run on whatever device each block is on and the pooled
    activations are gathered on the device of the embeddings.
    """
    from transformers import AutoConfig, AutoTokenizer

    load_args: dict[str, Any] = dict(name_or_path=name_or_path, dtype=dtype, device=device, revision=revision,
                     trust_remote_code=trust_remote_code, device_map=device_map)

    dev = resolve_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    source = resolve_model_path(name_or_path)
    is_local = os.path.isdir(source)
    if is_local:
        model_id = BUNDLED_MODEL_IDS.get(name_or_path.lower(), source)
    else:
        model_id = name_or_path
        # A hub id is "name" or "org/name"; anything else that is not a directory is a bad path.
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path):
            raise ModelLoadError(f"model {name_or_path!r}: no such checkpoint directory")

    def attempt(local_only: bool) -> tuple[Any, Any, Any]:
        common: dict[str, Any] = dict(local_files_only=local_only, trust_remote_code=trust_remote_code)
        if not is_local and revision is not None:
            common["revision"] = revision
        config = AutoConfig.from_pretrained(source, **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        if weights:
            model = _load_weights(source, config, common, torch_dtype, dev, device_map)
        else:
            model = _skeleton(config, torch_dtype, trust_remote_code)
        return config, tokenizer, model

    try:
        with _quiet_transformers():
            try:
                config, tokenizer, model = attempt(local_only=True)
            except OSError as local_exc:
                if is_local or hub_offline():
                    hint = "" if is_local else " (not in the local Hugging Face cache and HF_HUB_OFFLINE is set)"
                    raise ModelLoadError(
                        f"model {name_or_path!r}: could not load from {source}{hint}: {local_exc}"
                    ) from local_exc
                log.info("model %s not fully cached locally; downloading from the hub", name_or_path)
                config, tokenizer, model = attempt(local_only=False)
    except ModelLoadError:
        raise
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model {name_or_path!r} needs its own code from the checkpoint; refusing to run it "
                f"(pass trust_remote_code=True / --trust-remote-code only if you trust {name_or_path!r})"
            ) from exc
        raise ModelLoadError(f"model {name_or_path!r}: loading failed: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"model {name_or_path!r}: loading failed: {type(exc).__name__}: {exc}") from exc

    model.eval()
    model.requires_grad_(False)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    hidden = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
    if not num_layers or not hidden:
        raise ModelLoadError(f"model {name_or_path!r}: its config gives no num_hidden_layers/hidden_size")

    resolved_revision = revision
    weights_dir: Path | None = Path(source) if is_local else None
    if not is_local:
        snapshot = snapshot_dir(source, revision)
        if snapshot is not None:
            resolved_revision = snapshot.name
            weights_dir = snapshot
    weights_hash = weights_fingerprint(weights_dir) if weights_dir is not None else None

    if not weights and not is_local and weights_hash is None:
        log.info("model %s: weight files not downloaded yet; loading them now", name_or_path)
        return load_model(**load_args, weights=True)
    if weights:
        log.debug("model %s: weights read from %s", model_id, source)

    param = next(model.parameters(), None)
    actual_dtype = param.dtype if param is not None else torch_dtype
    placement = dict(getattr(model, "hf_device_map", None) or {}) if weights else None
    if placement:
        # The first placed module holds the embeddings: where inputs go and activations are gathered.
        actual_device = _expected_device(map_device(next(v for v in placement.values() if str(v) != "disk")))
    elif weights:
        actual_device = str(param.device) if param is not None else dev
    else:
        actual_device = _expected_device(dev)

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        revision=resolved_revision,
        weights_hash=weights_hash,
        dtype=_DTYPE_NAMES.get(actual_dtype, str(actual_dtype).removeprefix("torch.")),
        device=actual_device,
        num_layers=int(num_layers),
        hidden_size=int(hidden),
        is_encoder=_is_encoder(text_config) or _is_encoder(config),
        text_config=text_config,
        weights_loaded=weights,
        load_args=load_args,
        device_map={k: str(map_device(v)) for k, v in placement.items()} if placement else None,
    )
