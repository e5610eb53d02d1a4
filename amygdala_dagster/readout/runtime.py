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
has one) and, one row per new token, while the model generates, with the
episode rule (:mod:`amygdala_dagster.readout.episode`) applied token by token
over the prompt and the generated tokens. It is the
executable specification of what the ReadoutManager computes and a way to use
the vectors without the vLLM build. :func:`scores_from_hidden` gives the same
scores from per-token activations read earlier (the per-token cache of the
calibration sample and the evaluation conversations), without a model.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from amygdala_dagster.engine.capture import capture, run_until_captured
from amygdala_dagster.engine.inputs import Encoded, Item, encode, special_ids
from amygdala_dagster.engine.layers import check_layer_indices, resolve_layers
from amygdala_dagster.engine.models import LoadedModel
from amygdala_dagster.readout.episode import EpisodeTrace, EpisodeTracker, episode_traces
from amygdala_dagster.readout.manifest import CalibratedReadout, ReadoutMatrix, calibration_entry
from amygdala_dagster.readout.metrics import z_score

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Positions left out of token calibration and firing, besides special tokens (see token_calibration.py).
DEFAULT_SKIP_FIRST_TOKENS = 1



# ----------------------------------------------------------------------------- projection
def _matrix(readout: ReadoutMatrix | Mapping[int, np.ndarray], layer: int) -> np.ndarray:
    vectors = readout.vectors if hasattr(readout, "vectors") else readout
    return np.asarray(vectors[int(layer)], dtype=np.float32)


def project(activations: Mapping[int, torch.Tensor],
            readout: ReadoutMatrix | Mapping[int, np.ndarray]) -> dict[int, torch.Tensor]:
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


def calibrated_scores(raw: torch.Tensor | np.ndarray, manifest: Mapping[str, Any], layer: int,
                      kind: str = "text") -> np.ndarray:
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


def scored_positions(special: Sequence[bool], skip_first_tokens: int) -> np.ndarray:
    """Positions a runtime threshold applies to: not a special token and not among the first ``skip_first_tokens``."""
    mask = ~np.asarray(special, dtype=bool)
    mask[: max(int(skip_first_tokens), 0)] = False
    return mask


def scored_mask(encoded: Encoded, skip_first_tokens: int) -> np.ndarray:
    """:func:`scored_positions` of an encoded input."""
    return scored_positions(encoded.special, skip_first_tokens)


def _num_layers(model: torch.nn.Module) -> int:
    config: Any = getattr(model, "config", None)
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
    #: The episode rule over the input, per layer whose concepts have one (manifests of format 3).
    episode: dict[int, EpisodeTrace] = field(default_factory=dict)

    @property
    def scored(self) -> np.ndarray:
        """Positions a threshold applies to (see :func:`scored_mask`)."""
        return scored_mask(self.encoded, self.skip_first_tokens)


@dataclass
class TokenRow:
    """The readout of one generated token: ``raw[layer]`` and ``calibrated[layer]`` are ``[C]``.

    ``episode[layer]`` is the episode rule's statistic after this token (the prompt and every token
    generated so far), ``episode_active[layer]`` whether the rule is active at it and
    ``episode_fired[layer]`` whether it has fired at any token so far, prompt included (``[C]`` each;
    empty for a manifest without episode rules).
    """

    position: int
    token_id: int
    token: str
    raw: dict[int, np.ndarray]
    calibrated: dict[int, np.ndarray]
    episode: dict[int, np.ndarray] = field(default_factory=dict)
    episode_active: dict[int, np.ndarray] = field(default_factory=dict)
    episode_fired: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class ReadoutRuntime:
    """Per-token readout on a Hugging Face model (base or ``*ForCausalLM``).

    ``readout`` is a :class:`~amygdala_dagster.readout.manifest.ReadoutPair` (vectors and
    manifest); without it (``None``) only :meth:`hidden_states` is available.
    ``layers`` default to the readout's; ``layer_path`` overrides the block
    stack's location as ``--layer-path`` does in training.
    """

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    readout: CalibratedReadout | None = None
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
        # the resolved values, typed for the methods below (the fields keep what was given, resolved)
        self._layers: list[int] = list(self.layers)
        self._skip: int = int(self.skip_first_tokens)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, readout: CalibratedReadout | None = None,
                    **kwargs: Any) -> ReadoutRuntime:
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

        def keep(slot: int, hidden: torch.Tensor) -> None:
            captured[slot] = hidden.detach().float().cpu()

        deepest = max(range(len(self._layers)), key=lambda s: self._layers[s])
        run_until_captured(self.model, self._modules, keep, deepest, input_ids=input_ids.to(self._device),
                           attention_mask=mask.to(self._device), **self._forward_kwargs)
        if any(c is None for c in captured):
            raise RuntimeError(f"the forward pass never reached layer(s) "
                               f"{[self._layers[s] for s, c in enumerate(captured) if c is None]}")
        return torch.stack(captured, dim=2).numpy()  # type: ignore[arg-type]  # [B, T, L, H]

    def scores_from_hidden(self, encoded: Encoded, hidden: np.ndarray, id: str | None = None) -> TokenScores:
        """Project ``hidden`` ``[T, L, H]`` (as :meth:`hidden_states` gives) on the readout's rows."""
        return scores_from_hidden(encoded, hidden, self._need_readout(), self._layers, self._skip, id)

    def score(self, item: Item, id: str | None = None) -> TokenScores:
        """Per-token raw and calibrated scores of every concept at every hooked layer for one input."""
        return next(iter(self.score_many([item], ids=[id] if id is not None else None)))

    def score_many(self, items: Sequence[Item], ids: Sequence[str] | None = None,
                   progress: Callable[[int], object] | None = None) -> list[TokenScores]:
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

        The episode rule runs over the prompt (from the prefill pass, every
        position) and then over each new token, its state carried from step
        to step: a row's ``episode_fired`` says whether the rule has fired
        anywhere in the conversation so far.
        """
        readout = self._need_readout()
        if not hasattr(self.model, "generate"):
            raise TypeError(f"{type(self.model).__name__} cannot generate: load the model with its LM head "
                            "(AutoModelForCausalLM)")
        from transformers import StoppingCriteria, StoppingCriteriaList

        enc = self.encode(item, add_generation_prompt=True)
        prompt_len = len(enc.ids)
        rows: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        done = object()
        step: dict[str, Any] = {"n": 0, "ids": None}
        captured: list[torch.Tensor | None] = [None] * len(self._modules)
        tracker = EpisodeTracker(readout.manifest, self._layers)
        skip = self._skip

        def pre_hook(module: Any, args: Any, kwargs: Any) -> None:
            step["ids"] = kwargs.get("input_ids", args[0] if args else None)

        def keep(slot: int, hidden: torch.Tensor) -> None:
            # The prefill pass reads the whole prompt (every position feeds the episode rule); later
            # passes read one new token each.
            captured[slot] = hidden[0].detach().float().cpu() if step["n"] == 0 else \
                hidden[0, -1:].detach().float().cpu()
            if all(c is not None for c in captured):
                ids = step["ids"]
                n = step["n"]
                step["n"] += 1
                if n == 0:
                    raw = project({layer: cast(torch.Tensor, captured[s]) for s, layer in enumerate(self._layers)},
                                  readout)
                    tracker.update({layer: r.numpy() for layer, r in raw.items()}, scored_positions(enc.special, skip))
                else:
                    token_id = int(ids[0, -1])
                    position = prompt_len + n - 1
                    scored = token_id not in self._specials and position >= skip
                    rows.put(self._row(position, token_id, cast(list[torch.Tensor], list(captured)), tracker, scored))
                captured[:] = [None] * len(captured)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        def work() -> None:
            try:
                with torch.inference_mode():
                    input_ids = torch.tensor([enc.ids], device=self._device)
                    out = cast(Any, self.model).generate(  # a transformers model with its LM head
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

        pre = self.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        worker = threading.Thread(target=work, name="amygdala-generate", daemon=True)
        try:
            with capture(self._modules, keep):
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
        finally:
            pre.remove()

    def _row(self, position: int, token_id: int, per_layer: list[torch.Tensor], tracker: EpisodeTracker,
             scored: bool) -> TokenRow:
        readout = self._need_readout()
        raw = {layer: t.numpy()[0] for layer, t in
               project({layer: per_layer[s] for s, layer in enumerate(self._layers)}, readout).items()}
        episode = tracker.update({layer: r[None] for layer, r in raw.items()}, [scored])
        return TokenRow(
            position=position, token_id=token_id, token=cast(str, self.tokenizer.convert_ids_to_tokens(token_id)),
            raw=raw,
            calibrated={layer: calibrated_scores(r, readout.manifest, layer, "token") for layer, r in raw.items()},
            episode={layer: stat[0] for layer, (stat, _) in episode.items()},
            episode_active={layer: act[0] for layer, (_, act) in episode.items()},
            episode_fired={layer: tracker.states[layer].fired.copy() for layer in episode},
        )

    def _need_readout(self) -> CalibratedReadout:
        if self.readout is None:
            raise ValueError("this runtime has no readout (vectors + manifest) to project on")
        return self.readout


def scores_from_hidden(encoded: Encoded, hidden: np.ndarray, readout: CalibratedReadout, hidden_layers: Sequence[int],
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
        episode=episode_traces(raw, scored_mask(encoded, skip), readout.manifest),
    )


def manifest_skip_first_tokens(manifest: Mapping[str, Any] | None) -> int:
    """The ``skip_first_tokens`` the manifest's token calibration used (the default when it has none)."""
    for per in ((manifest or {}).get("per_concept") or {}).values():
        for entry in (per.get("layers") or {}).values():
            tok = (entry or {}).get("token_calibration")
            if tok and tok.get("skip_first_tokens") is not None:
                return int(tok["skip_first_tokens"])
    return DEFAULT_SKIP_FIRST_TOKENS


__all__ = [
    "DEFAULT_SKIP_FIRST_TOKENS", "ReadoutRuntime", "TokenRow", "TokenScores", "calibrated_scores",
    "manifest_skip_first_tokens", "project", "scored_mask", "scored_positions", "scores_from_hidden",
]

