"""Runtime reference: the per-token readout a vLLM ReadoutManager computes, on a Hugging Face model.

At every forward pass (prefill and each decode step) the runtime takes the
residual stream after each hooked decoder layer ``idx`` -- the output of block
``idx``, found by the same :func:`amygdala_dagster.engine.layers.resolve_layers` as
training -- and projects every token on the concept rows:
``raw[t, c] = h_idx[t] . vectors[c]``. The calibrated score is the z-score of
``raw`` against the manifest's ``token_calibration`` (:func:`calibrated_scores`;
per mean-pooled text the same against ``calibration``; :func:`project` is the
projection itself).

:class:`ReadoutRuntime` attaches to a model and gives these scores for a text
or a conversation (messages go through the tokenizer's chat template when it
has one) and, one row per new token, while the model generates. It is the
executable specification of what the ReadoutManager computes and a way to use
the vectors without the vLLM build. :class:`TokenActivationCache` keeps the
per-token activations of calibration and evaluation texts (content-addressed
by token ids, per activation fingerprint), so new vectors are calibrated
without a forward pass.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from safetensors.numpy import load as st_load_bytes
from safetensors.numpy import save as st_save_numpy

from amygdala_dagster.files.atomic import atomic_write_bytes
from amygdala_dagster.engine.cache import cache_location, fingerprint_id
from amygdala_dagster.readout.metrics import z_score
from amygdala_dagster.files.jsonio import jsonl_objects
from amygdala_dagster.engine.layers import check_layer_indices, resolve_layers
from amygdala_dagster.readout.manifest import calibration_entry
from amygdala_dagster.files.storage import Store

log = logging.getLogger(__name__)

#: Positions left out of token calibration and firing, besides special tokens (see token_calibration.py).
DEFAULT_SKIP_FIRST_TOKENS = 1

Message = Mapping[str, str]
#: A text, or a conversation as chat messages ``[{"role", "content"}, ...]``.
Item = Union[str, Sequence[Message]]

TOKEN_CACHE_FORMAT = "amygdala-token-activations/1"


# ----------------------------------------------------------------------------- projection
def _matrix(readout: Any, layer: int) -> np.ndarray:
    vectors = readout.vectors if hasattr(readout, "vectors") else readout
    return np.asarray(vectors[int(layer)], dtype=np.float32)


def project(activations: Mapping[int, Any], readout: Any) -> dict[int, torch.Tensor]:
    """Per layer ``activation [T, H] @ vectors.T`` -> ``[T, C]`` float32.

    ``readout`` is a :class:`~amygdala_dagster.readout.manifest.ReadoutPair`, a
    :class:`~amygdala_dagster.readout.vectors.TrainedReadout` or a plain
    ``{layer: [C, H]}`` mapping. Layers of ``activations`` that the readout
    does not hook are ignored.
    """
    layers = readout.layers if hasattr(readout, "layers") else list(readout)
    out: dict[int, torch.Tensor] = {}
    for layer, act in activations.items():
        if int(layer) not in layers:
            continue
        a = act if isinstance(act, torch.Tensor) else torch.as_tensor(np.asarray(act))
        a = a.detach().to("cpu", torch.float32)
        if a.ndim == 1:
            a = a[None, :]
        w = torch.from_numpy(_matrix(readout, layer))
        if a.shape[-1] != w.shape[1]:
            raise ValueError(f"layer {layer}: activations have width {a.shape[-1]}, vectors {w.shape[1]}")
        out[int(layer)] = a @ w.T
    return out


def calibrated_scores(raw: Any, manifest: Mapping[str, Any], layer: int, kind: str = "text") -> np.ndarray:
    """Calibrated scores ``[..., C]`` for raw projections ``[..., C]`` at ``layer``: per concept the
    z-score (:func:`amygdala_dagster.readout.metrics.z_score`) against the manifest's ``kind``
    calibration (``text``: held-out mean-pooled texts; ``token``: per-token projections of the
    calibration text). NaN for a concept without that calibration."""
    raw_arr = raw.detach().cpu().double().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw, np.float64)
    concepts = list(manifest["concepts"])
    if raw_arr.shape[-1] != len(concepts):
        raise ValueError(f"raw scores have {raw_arr.shape[-1]} concepts, manifest lists {len(concepts)}")
    out = np.full(raw_arr.shape, np.nan, dtype=np.float64)
    for i, concept in enumerate(concepts):
        cal = calibration_entry(manifest, concept, layer, kind)
        if cal and cal.get("neg_mean") is not None and cal.get("neg_std") is not None:
            out[..., i] = z_score(raw_arr[..., i], cal["neg_mean"], cal["neg_std"])
    return out


class InputError(ValueError):
    """An input file or record that cannot be used; the message names the file and line."""


# ----------------------------------------------------------------------------- inputs
@dataclass
class InputRecord:
    """One line of an input JSONL file: a text or a conversation, optionally labelled."""

    id: str
    item: Item
    emotions: list[str] | None = None

    @property
    def text(self) -> str:
        """The text, or the conversation's contents joined by newlines (for display)."""
        if isinstance(self.item, str):
            return self.item
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.item)


def _parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InputError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f'{where}: message {i} is not an object with string "role" and "content"')
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_inputs(path: str | Path, *, labelled: bool = False) -> list[InputRecord]:
    """Records of a JSONL file: one ``{"text": ...}`` or ``{"messages": [...]}`` per line.

    ``id`` is optional (default: the line number) but must be unique. With
    ``labelled`` every line needs ``"emotions": [names]`` (may be empty).
    Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    records: list[InputRecord] = []
    seen: set[str] = set()
    for where, obj in jsonl_objects(path, InputError):
        if isinstance(obj.get("text"), str) == ("messages" in obj):
            raise InputError(f'{where}: give exactly one of "text" (a string) or "messages"')
        item: Item = obj["text"] if "text" in obj else _parse_messages(obj["messages"], where)
        if isinstance(item, str) and not item.strip():
            raise InputError(f"{where}: empty text")
        rid = str(obj.get("id", where.rpartition(":")[2]))  # default: the line number
        if rid in seen:
            raise InputError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        emotions = obj.get("emotions")
        if labelled and not (isinstance(emotions, list) and all(isinstance(e, str) for e in emotions)):
            raise InputError(f'{where}: expected "emotions": a list of emotion names')
        records.append(InputRecord(rid, item, list(emotions) if emotions is not None else None))
    if not records:
        raise InputError(f"{path}: no records")
    return records


# ----------------------------------------------------------------------------- tokenisation
@dataclass
class Encoded:
    """Token ids of one input, which of them are special tokens, and their strings."""

    ids: list[int]
    special: list[bool]
    tokens: list[str]
    #: Each token's piece of the text, with the whitespace before it (special tokens: their name).
    pieces: list[str] = field(default_factory=list)
    #: Tokens of the whole input, before the cut to ``max_tokens`` (None: not counted).
    n_tokens_total: int | None = None

    @property
    def truncated(self) -> bool:
        """Whether ``max_tokens`` cut the input (``ids`` hold only part of it)."""
        return self.n_tokens_total is not None and self.n_tokens_total > len(self.ids)

    @property
    def key(self) -> str:
        """Content address of the token sequence (the token-activation cache key)."""
        return hashlib.sha256(json.dumps(self.ids, separators=(",", ":")).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.ids)


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens, including special added tokens (chat markers)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for idx, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool,
              max_tokens: int | None) -> tuple[list[int], list, int]:
    """Token ids cut to ``max_tokens`` as the tokenizer truncates, their offsets (empty when the tokenizer
    gives none) and how many tokens the whole text has.

    A fast tokenizer tokenises the whole text before it truncates and keeps
    what it cut in ``Encoding.overflowing`` (chunks of the same length, each
    with the special tokens added again): the count comes from there, without
    tokenising the text a second time.
    """
    kw = dict(add_special_tokens=add_special_tokens, truncation=max_tokens is not None, max_length=max_tokens,
              verbose=False)
    try:
        enc = tokenizer(text, return_offsets_mapping=True, **kw)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        enc = tokenizer(text, **kw)
        ids, offsets = list(enc["input_ids"]), []
    total = len(ids)
    if max_tokens is not None and len(ids) >= max_tokens:
        encodings = getattr(enc, "encodings", None)
        if encodings:
            added = tokenizer.num_special_tokens_to_add(pair=False) if add_special_tokens else 0
            total += sum(len(o.ids) - added for o in encodings[0].overflowing)
        else:  # no record of the cut: count the whole text
            total = len(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
    return ids, offsets, total


def _pieces(tokenizer: Any, text: str, ids: list[int], offsets: list, special: list[bool]) -> list[str]:
    """The text each token covers, with the gap before it, so that the pieces read as the text."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if len(offsets) != len(ids):
        return [tokens[i] if special[i] else tokenizer.decode([t]) for i, t in enumerate(ids)]
    out, cursor = [], 0
    for i, (start, end) in enumerate(offsets):
        if special[i] or end <= start:
            out.append(tokens[i] if special[i] else "")
            continue
        out.append(text[cursor:end] if start >= cursor else text[start:end])
        cursor = max(cursor, end)
    return out


def encode(tokenizer: Any, item: Item, max_tokens: int | None = None, *,
           add_generation_prompt: bool = False, specials: set[int] | None = None) -> Encoded:
    """Tokenise a text as training does (``add_special_tokens=True``) or a conversation through the
    tokenizer's chat template (plain ``role: content`` lines when it has none); truncate to ``max_tokens``
    (:attr:`Encoded.n_tokens_total` keeps the whole input's count)."""
    if isinstance(item, str):
        text, add_special = item, True
    else:
        messages = [dict(m) for m in item]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            add_special = False  # the template places the special tokens itself
        else:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            text += "\nassistant:" if add_generation_prompt else ""
            add_special = True
    ids, offsets, total = _tokenize(tokenizer, text, add_special, max_tokens)
    ids = [int(i) for i in ids]
    specials = special_ids(tokenizer) if specials is None else specials
    special = [i in specials for i in ids]
    return Encoded(ids=ids, special=special, tokens=list(tokenizer.convert_ids_to_tokens(ids)),
                   pieces=_pieces(tokenizer, text, ids, offsets, special), n_tokens_total=total)


def scored_mask(encoded: Encoded, skip_first_tokens: int) -> np.ndarray:
    """Positions a runtime threshold applies to: not a special token and not among the first ``skip_first_tokens``."""
    mask = ~np.asarray(encoded.special, dtype=bool)
    mask[: max(int(skip_first_tokens), 0)] = False
    return mask


# ----------------------------------------------------------------------------- capture
class _Stop(Exception):
    """Raised from the deepest hooked block to end a scoring pass early."""


def _block_output(output: Any) -> torch.Tensor:
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor):
        hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"layer output of type {type(output).__name__} holds no hidden-state tensor")
    return hidden


def _num_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    if not n:
        raise ValueError(f"{type(model).__name__}: its config gives no num_hidden_layers")
    return int(n)


@dataclass
class TokenScores:
    """Per-token readout of one input: ``raw[layer]`` and ``calibrated[layer]`` are ``[T, C]``."""

    encoded: Encoded
    concepts: list[str]
    layers: list[int]
    raw: dict[int, np.ndarray]
    calibrated: dict[int, np.ndarray]
    skip_first_tokens: int
    id: str | None = None

    @property
    def scored(self) -> np.ndarray:
        """Positions a threshold applies to (see :func:`scored_mask`)."""
        return scored_mask(self.encoded, self.skip_first_tokens)


@dataclass
class TokenRow:
    """The readout of one generated token: ``raw[layer]`` and ``calibrated[layer]`` are ``[C]``."""

    position: int
    token_id: int
    token: str
    raw: dict[int, np.ndarray]
    calibrated: dict[int, np.ndarray]


@dataclass
class ReadoutRuntime:
    """Per-token readout on a Hugging Face model (base or ``*ForCausalLM``).

    ``readout`` is a :class:`~amygdala_dagster.readout.manifest.ReadoutPair` (vectors and
    manifest); without it (``None``) only :meth:`hidden_states` is available.
    ``layers`` default to the readout's; ``layer_path`` overrides the block
    stack's location as ``--layer-path`` does in training.
    """

    model: torch.nn.Module
    tokenizer: Any
    readout: Any = None
    layers: Sequence[int] | None = None
    layer_path: str | None = None
    max_tokens: int | None = None
    #: Sequences per batch; None: as many as ``max_batch_tokens`` holds.
    batch_size: int | None = 8
    max_batch_tokens: int = 16384
    skip_first_tokens: int | None = None
    _modules: list[torch.nn.Module] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = _num_layers(self.model)
        wanted = self.layers if self.layers is not None else (self.readout.layers if self.readout else None)
        if wanted is None:
            raise ValueError("no layers: give a readout or layers")
        self.layers = check_layer_indices([int(x) for x in wanted], n, type(self.model).__name__)
        resolved = resolve_layers(self.model, n, self.layer_path)
        self._modules = [resolved.modules[i] for i in self.layers]
        self._specials = special_ids(self.tokenizer)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._pad_id = int(self.tokenizer.pad_token_id or 0)
        param = next(self.model.parameters())
        self._device = param.device
        accepts = inspect.signature(self.model.forward).parameters
        self._forward_kwargs = {"use_cache": False} if "use_cache" in accepts else {}
        if self.skip_first_tokens is None:
            self.skip_first_tokens = manifest_skip_first_tokens(self.readout.manifest) if self.readout else \
                DEFAULT_SKIP_FIRST_TOKENS

    @classmethod
    def from_loaded(cls, loaded: Any, readout: Any = None, **kwargs: Any) -> ReadoutRuntime:
        """A runtime over a :class:`~amygdala_dagster.engine.models.LoadedModel` (with its weights)."""
        loaded = loaded.with_weights()
        return cls(loaded.model, loaded.tokenizer, readout, **kwargs)

    # -- tokenisation --------------------------------------------------------------------------
    def encode(self, item: Item, *, add_generation_prompt: bool = False) -> Encoded:
        return encode(self.tokenizer, item, self.max_tokens, add_generation_prompt=add_generation_prompt,
                      specials=self._specials)

    # -- prefill -------------------------------------------------------------------------------
    def hidden_states(self, encoded: Sequence[Encoded]) -> Iterator[tuple[int, np.ndarray]]:
        """``(index, [T, L, H] float32)`` per input: the residual stream after each hooked layer at every
        position. Batched longest first under ``batch_size`` and ``max_batch_tokens`` (right padding;
        padded positions are dropped). The pass stops after the deepest hooked layer."""
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        pos = 0
        while pos < len(order):
            longest = max(len(encoded[order[pos]]), 1)
            size = 1
            while (pos + size < len(order) and (self.batch_size is None or size < self.batch_size)
                   and (size + 1) * longest <= self.max_batch_tokens):
                size += 1
            batch = order[pos:pos + size]
            pos += size
            hidden = self._run_batch([encoded[i].ids for i in batch])
            for row, i in enumerate(batch):
                yield i, hidden[row, : len(encoded[i])]

    def _run_batch(self, ids: list[list[int]]) -> np.ndarray:
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        captured: list[torch.Tensor | None] = [None] * len(self._modules)
        deepest = max(range(len(self.layers)), key=lambda s: self.layers[s])

        def hook(slot: int) -> Callable:
            def fn(module: Any, args: Any, output: Any) -> None:
                captured[slot] = _block_output(output).detach().float().cpu()
                if slot == deepest:
                    raise _Stop
            return fn

        handles = [m.register_forward_hook(hook(s)) for s, m in enumerate(self._modules)]
        try:
            with torch.inference_mode():
                try:
                    self.model(input_ids=input_ids.to(self._device), attention_mask=mask.to(self._device),
                               **self._forward_kwargs)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in captured):
            raise RuntimeError(f"the forward pass never reached layer(s) "
                               f"{[self.layers[s] for s, c in enumerate(captured) if c is None]}")
        return torch.stack(captured, dim=2).numpy()  # [B, T, L, H]

    def scores_from_hidden(self, encoded: Encoded, hidden: np.ndarray, id: str | None = None) -> TokenScores:
        """Project ``hidden`` ``[T, L, H]`` (as :meth:`hidden_states` gives) on the readout's rows."""
        self._need_readout()
        return scores_from_hidden(encoded, hidden, self.readout, self.layers, int(self.skip_first_tokens), id)

    def score(self, item: Item, id: str | None = None) -> TokenScores:
        """Per-token raw and calibrated scores of every concept at every hooked layer for one input."""
        return next(iter(self.score_many([item], ids=[id] if id is not None else None)))

    def score_many(self, items: Sequence[Item], ids: Sequence[str] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[TokenScores]:
        """:meth:`score` for several inputs, batched; ``progress(n_done)`` after each input."""
        encoded = [self.encode(x) for x in items]
        out: list[TokenScores | None] = [None] * len(encoded)
        for n, (i, hidden) in enumerate(self.hidden_states(encoded), 1):
            out[i] = self.scores_from_hidden(encoded[i], hidden, ids[i] if ids is not None else None)
            if progress is not None:
                progress(n)
        return out  # type: ignore[return-value]

    # -- generation ----------------------------------------------------------------------------
    def generate(self, item: Item, *, max_new_tokens: int = 32, **generate_kwargs: Any) -> Iterator[TokenRow]:
        """Generate from ``item`` (``model.generate``, a ``*ForCausalLM`` model) and yield one
        :class:`TokenRow` per new token as it is produced.

        The row of a token comes from the forward pass that reads it, as in
        the runtime (the decode step after it was sampled); the last new
        token, which generation never feeds back, gets one extra
        single-token step on the returned KV cache. Closing the generator
        stops generation at the next step.
        """
        self._need_readout()
        if not hasattr(self.model, "generate"):
            raise TypeError(f"{type(self.model).__name__} cannot generate: load the model with its LM head "
                            "(AutoModelForCausalLM)")
        from transformers import StoppingCriteria, StoppingCriteriaList

        enc = self.encode(item, add_generation_prompt=True)
        prompt_len = len(enc.ids)
        rows: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()
        step = {"n": 0, "ids": None}
        captured: list[torch.Tensor | None] = [None] * len(self._modules)

        def pre_hook(module: Any, args: Any, kwargs: Any) -> None:
            step["ids"] = kwargs.get("input_ids", args[0] if args else None)

        def hook(slot: int) -> Callable:
            def fn(module: Any, args: Any, output: Any) -> None:
                captured[slot] = _block_output(output)[0, -1].detach().float().cpu()
                if all(c is not None for c in captured):
                    ids = step["ids"]
                    n = step["n"]
                    step["n"] += 1
                    if n > 0:  # the prefill pass reads the prompt; later passes read one new token each
                        token_id = int(ids[0, -1])
                        rows.put(self._row(prompt_len + n - 1, token_id, list(captured)))
                    captured[:] = [None] * len(captured)
            return fn

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                with torch.inference_mode():
                    input_ids = torch.tensor([enc.ids], device=self._device)
                    out = self.model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                        stopping_criteria=StoppingCriteriaList([_Cancel()]),
                        pad_token_id=self._pad_id, **generate_kwargs,
                    )
                    seq = out.sequences
                    if seq.shape[1] > prompt_len and not stop.is_set():
                        self.model(input_ids=seq[:, -1:], attention_mask=torch.ones_like(seq),
                                   cache=out.cache, use_cache=True)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                rows.put(exc)
            finally:
                rows.put(done)

        handles = [m.register_forward_hook(hook(s)) for s, m in enumerate(self._modules)]
        handles.append(self.model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        worker = threading.Thread(target=work, name="amygdala-generate", daemon=True)
        worker.start()
        try:
            while True:
                got = rows.get()
                if got is done:
                    break
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            stop.set()
            worker.join()
            for h in handles:
                h.remove()

    def _row(self, position: int, token_id: int, per_layer: list[torch.Tensor]) -> TokenRow:
        raw = {layer: t.numpy()[0] for layer, t in
               project({layer: per_layer[s][None] for s, layer in enumerate(self.layers)}, self.readout).items()}
        return TokenRow(
            position=position, token_id=token_id, token=self.tokenizer.convert_ids_to_tokens(token_id), raw=raw,
            calibrated={layer: calibrated_scores(r, self.readout.manifest, layer, "token") for layer, r in raw.items()},
        )

    def _need_readout(self) -> None:
        if self.readout is None:
            raise ValueError("this runtime has no readout (vectors + manifest) to project on")


def scores_from_hidden(encoded: Encoded, hidden: np.ndarray, readout: Any, hidden_layers: Sequence[int],
                       skip_first_tokens: int | None = None, id: str | None = None) -> TokenScores:
    """:class:`TokenScores` of one input from its per-token activations ``[T, L, H]`` (layers in
    ``hidden_layers`` order; the readout's layers are taken from them) -- no model needed."""
    hidden_layers = [int(x) for x in hidden_layers]
    layers = [int(x) for x in readout.layers]
    raw = {layer: t.numpy() for layer, t in
           project({layer: torch.from_numpy(np.ascontiguousarray(hidden[:, hidden_layers.index(layer)]))
                    for layer in layers}, readout).items()}
    skip = manifest_skip_first_tokens(readout.manifest) if skip_first_tokens is None else int(skip_first_tokens)
    return TokenScores(
        encoded=encoded, concepts=list(readout.concepts), layers=layers, raw=raw,
        calibrated={layer: calibrated_scores(r, readout.manifest, layer, "token") for layer, r in raw.items()},
        skip_first_tokens=skip, id=id,
    )


def manifest_skip_first_tokens(manifest: Mapping[str, Any] | None) -> int:
    """The ``skip_first_tokens`` the manifest's token calibration used (the default when it has none)."""
    for per in ((manifest or {}).get("per_concept") or {}).values():
        for entry in (per.get("layers") or {}).values():
            tok = (entry or {}).get("token_calibration")
            if tok and tok.get("skip_first_tokens") is not None:
                return int(tok["skip_first_tokens"])
    return DEFAULT_SKIP_FIRST_TOKENS


# ----------------------------------------------------------------------------- token cache
class TokenActivationCache:
    """Per-token activations ``[T, L, H]`` of token sequences, per activation fingerprint.

    One safetensors file per sequence under
    ``root/tokens/<fingerprint id>/<key[:2]>/<key>.safetensors`` (key =
    :attr:`Encoded.key`): float32 for a float32 model, float16 for a 16-bit
    one (read back as float32). Kept for the texts the
    calibration and the conversation evaluation read, so a new or retrained
    vector is calibrated without a forward pass.
    """

    def __init__(self, root: str | Path, fingerprint: Mapping[str, Any], dtype: str = "float32") -> None:
        self.fingerprint_id = fingerprint_id(fingerprint)
        # A path or an fsspec URL (s3://...), like the pooled cache beside it.
        self.store = Store(f"{cache_location(root)}/tokens/{self.fingerprint_id}")
        self.dtype = np.float16 if dtype in ("float16", "bfloat16") else np.float32

    @staticmethod
    def _rel(key: str) -> str:
        return f"{key[:2]}/{key}.safetensors"

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.store.exists(self._rel(key))

    def get(self, key: str) -> np.ndarray:
        return st_load_bytes(self.store.read_bytes(self._rel(key)))["h"].astype(np.float32)

    def put(self, key: str, hidden: np.ndarray) -> None:
        data = st_save_numpy({"h": np.ascontiguousarray(hidden, dtype=self.dtype)},
                             metadata={"format": TOKEN_CACHE_FORMAT})
        with self.store.local_for_write(self._rel(key)) as path:  # local: the file itself; remote: uploaded
            atomic_write_bytes(path, data)


def token_activations(
    encoded: Sequence[Encoded],
    cache: TokenActivationCache | None,
    runtime_factory: Callable[[], ReadoutRuntime],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, [T, L, H])`` per encoded input: from ``cache`` where present, else forwarded through
    the runtime ``runtime_factory()`` builds (called at most once, and only when something is missing)
    and stored. ``progress(done, total)`` after each input."""
    total = len(encoded)
    done = 0
    missing: list[int] = []
    for i, enc in enumerate(encoded):
        if cache is not None and enc.key in cache:
            done += 1
            if progress:
                progress(done, total)
            yield i, cache.get(enc.key)
        else:
            missing.append(i)
    if not missing:
        return
    unique: dict[str, int] = {}
    for i in missing:
        unique.setdefault(encoded[i].key, i)
    runtime = runtime_factory()
    log.info("forwarding %d token sequences for per-token activations", len(unique))
    firsts = list(unique.values())
    by_key: dict[str, list[int]] = {}
    for i in missing:
        by_key.setdefault(encoded[i].key, []).append(i)
    for j, hidden in runtime.hidden_states([encoded[i] for i in firsts]):
        key = encoded[firsts[j]].key
        if cache is not None:
            cache.put(key, hidden)
        for i in by_key[key]:
            done += 1
            if progress:
                progress(done, total)
            yield i, hidden


__all__ = [
    "DEFAULT_SKIP_FIRST_TOKENS", "Encoded", "InputError", "InputRecord", "Item", "ReadoutRuntime",
    "TokenActivationCache", "TokenRow", "TokenScores", "encode", "manifest_skip_first_tokens", "read_inputs",
    "scored_mask", "scores_from_hidden", "special_ids", "token_activations",
]

