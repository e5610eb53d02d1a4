"""Pooled residual-stream activations at chosen layers, one forward pass per text.

:class:`ActivationEngine` tokenises the texts once, sorts them longest first,
batches them under a padded-token budget (and a text count, when a batch size
is given: without one, a GPU is kept busy by the budget alone), runs the model with
forward hooks on the target blocks and pools each block's output per text.

What is captured at layer ``idx`` is the raw output of block ``idx``: the
residual stream after that block. For every ``idx < num_layers - 1`` this is
Hugging Face's ``hidden_states[idx + 1]``. For the final block it is *not*
necessarily ``hidden_states[-1]``: many architectures (GPT-2, Llama, Qwen...)
apply the final norm before reporting the last hidden state, whereas the hook
sees the block's output before that norm (which is what a runtime hooking the
same block sees).

Batches hold texts of one padded length (:func:`padded_length`, a function of
the text's own length), so a text's activations do not depend on which other
texts it was forwarded with (byte-identical on CPU; on a GPU as far as the
kernels are batch-size invariant).

The pass stops right after the deepest target block (its hook raises a private
exception that the engine catches): no later block, final norm or head runs.

An engine built from a weight-less model (``load_model(..., weights=False)``)
has its fingerprint at once and loads the weights on the first
:meth:`ActivationEngine.forward` call that has a text to forward, so a run
whose activations are all cached never reads the checkpoint.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from amygdala_dagster.engine.cache import fingerprint_id, reject_empty_texts
from amygdala_dagster.engine.capture import run_until_captured
from amygdala_dagster.engine.checkpoints import ModelLoadError
from amygdala_dagster.engine.fast_path import FastPath, linear_attention_fast_path
from amygdala_dagster.engine.inputs import token_ids
from amygdala_dagster.engine.layers import check_layer_indices, resolve_layers
from amygdala_dagster.engine.models import LoadedModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

POOLINGS = ("mean", "last")

#: Bumped when what the engine computes for the same inputs changes (invalidates caches).
ENGINE_VERSION = 2  # 2: canonical padded lengths (padded_length)

#: Padded tokens per batch when no batch size is given: the best of the H200 sweep in
#: benchmarks/RESULTS.md (11,912 tokens/s at 8,192; 11,535 at 16,384; 10,848 at 32,768).
DEFAULT_MAX_BATCH_TOKENS = 8192
#: The padded-token cap that goes with a given batch size (the seed's behaviour).
BATCH_SIZE_MAX_BATCH_TOKENS = 16384
_MEASURED_SMALL_BATCH = "5.4k"
_MEASURED_TOKEN_BUDGET = "11.9k"


_PROBE_TEXT = "Probe: the quick brown fox, 12 naïve cafés — émotions & <tags>!"


class ActivationOutOfMemoryError(torch.OutOfMemoryError):
    """Out of memory even with a single text in the batch."""


class FingerprintMismatchError(ModelLoadError):
    """The model loaded with its weights does not give the fingerprint computed without them."""


@dataclass
class EngineStats:
    """Counters over every :meth:`ActivationEngine.forward` call of one engine."""

    texts: int = 0
    tokens: int = 0
    truncated: int = 0
    batches: int = 0
    seconds: float = 0.0
    oom_retries: int = 0
    peak_memory_bytes: int = 0
    device: str = "cpu"
    #: Seconds spent loading the weights inside ``forward`` (lazy engines only).
    load_seconds: float = 0.0
    #: Texts per batch as given (None: batched by the token budget alone) and the padded-token budget.
    batch_size: int | None = None
    max_batch_tokens: int = 0
    #: Linear-attention fast path (``yes`` / ``no`` / ``not-applicable``) and the kernels found / missing.
    fast_path: str = "not-applicable"
    kernels_found: list[str] = field(default_factory=list)
    kernels_missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalisation, post-processing)
    plus the ids it gives a fixed probe text (catches Python-level options such as add_bos)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Runtime state that the last call left behind, not part of what the tokenizer is.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        digest.update(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    probe = tokenizer(_PROBE_TEXT, add_special_tokens=True)["input_ids"]
    digest.update(json.dumps(list(probe)).encode())
    return digest.hexdigest()


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``hidden`` [B, T, H] over positions where ``mask`` [B, T] is 1, in float32.

    ``mean``: masked mean over every non-padding position; ``last``: the last
    non-padding position of each row.
    """
    h = hidden.float()
    m = mask.to(device=h.device, dtype=torch.float32)
    if pooling == "mean":
        return (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1, keepdim=True).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(m.shape[1], device=h.device).expand_as(m)
        last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp_min(0)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")


def padded_length(n_tokens: int, max_tokens: int) -> int:
    """The length a text of ``n_tokens`` tokens is padded to in a batch: a function of the text alone.

    Rounded up to a step of 1/8 to 1/16 of the length (at least 8), at most
    ``max_tokens``. Padding changes a text's activations in the last float
    bits (the attention reductions run over the padded length), so a length
    that does not depend on the other texts of the batch makes the cached
    activations a function of the text: the same bytes whether the texts are
    forwarded in one process, split into shards, or resumed after a kill.
    Batches hold texts of one padded length; the cost is at most 1/8 (on
    average ~1/16) more positions than the longest text of a batch.
    """
    step = max(8, 1 << max(int(n_tokens).bit_length() - 4, 0))
    return min(-(-int(n_tokens) // step) * step, max(int(max_tokens), int(n_tokens)))


def batch_size_advice(batch_size: int, padded_lengths: Sequence[int], max_batch_tokens: int) -> str | None:
    """A one-line note when ``batch_size`` is far (4x or more) below what the token budget allows, else None.

    ``padded_lengths`` are the texts' padded lengths; the budget allows
    ``max_batch_tokens // median`` texts of the median length.
    """
    if not padded_lengths:
        return None
    ordered = sorted(int(x) for x in padded_lengths)
    median = ordered[len(ordered) // 2]
    allowed = max(1, int(max_batch_tokens) // max(median, 1))
    if allowed < 4 * int(batch_size) or allowed < 8:
        return None
    return (f"batch size {batch_size} is far below what the token budget allows ({allowed} texts of the median "
            f"{median} tokens in {max_batch_tokens} tokens); on an H200 a 27B model ran {_MEASURED_SMALL_BATCH} "
            f"tokens/s at batch size 4 against {_MEASURED_TOKEN_BUDGET} tokens/s batched by a "
            f"{DEFAULT_MAX_BATCH_TOKENS}-token budget (benchmarks/RESULTS.md). Leave the batch size unset to "
            f"batch by tokens")


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class ActivationEngine:
    """Runs texts through a loaded model and yields pooled activations at ``layers``.

    The output tensor's second axis follows ``layers`` in the order given.
    ``loaded`` may be weight-less (``load_model(..., weights=False)``): the
    fingerprint is known at once and the weights are loaded by the first
    :meth:`forward` that has texts (``on_weights_loaded`` is then called with
    the loaded model).
    """

    def __init__(self, loaded: LoadedModel, layers: Sequence[int], *, pooling: str = "mean",
                 max_tokens: int = 512, batch_size: int | None = None, max_batch_tokens: int | None = None,
                 layer_path: str | None = None,
                 on_weights_loaded: Callable[[LoadedModel], None] | None = None) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        if max_batch_tokens is None:
            max_batch_tokens = DEFAULT_MAX_BATCH_TOKENS if batch_size is None else BATCH_SIZE_MAX_BATCH_TOKENS
        for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size),
                            ("max_batch_tokens", max_batch_tokens)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.layers = check_layer_indices(layers, loaded.num_layers, loaded.model_id)
        self.pooling = pooling
        #: Texts per batch as given, or None: batches are bounded by ``max_batch_tokens`` alone.
        self.batch_size: int | None = int(batch_size) if batch_size is not None else None
        self.max_batch_tokens = int(max_batch_tokens)
        self._advised = False
        self._fast_path_warned = False
        self._requested_max_tokens = int(max_tokens)
        self._layer_path = layer_path
        self._on_weights_loaded = on_weights_loaded
        self._load_lock = threading.Lock()
        self._bind(loaded)
        self.stats = EngineStats(device=loaded.device, batch_size=self.batch_size,
                                 max_batch_tokens=self.max_batch_tokens, fast_path=self.fast_path.fast_path,
                                 kernels_found=list(self.fast_path.kernels_found),
                                 kernels_missing=list(self.fast_path.kernels_missing))

    # -- setup helpers -------------------------------------------------------------------------

    def _bind(self, loaded: LoadedModel) -> None:
        """Everything that depends on the model: layer modules, tokenizer, fingerprint, input device."""
        self.loaded = loaded
        self.max_tokens = self._effective_max_tokens(self._requested_max_tokens)

        resolved = resolve_layers(loaded.model, loaded.num_layers, self._layer_path)
        self.resolved_layer_path: str = resolved.path
        self._modules = [resolved.modules[i] for i in self.layers]
        self._deepest_slot = max(range(len(self.layers)), key=lambda s: self.layers[s])

        #: Which path the model's linear-attention layers take (see :func:`linear_attention_fast_path`).
        self.fast_path: FastPath = linear_attention_fast_path(loaded.model, loaded.device)
        self.tokenizer = loaded.tokenizer
        self.tokenizer_hash = tokenizer_hash(self.tokenizer)
        self._pad_id = self._prepare_tokenizer()

        self.fingerprint: dict[str, Any] = {
            "engine_version": ENGINE_VERSION,
            "model": loaded.model_id,
            "revision": loaded.revision,
            "weights_hash": loaded.weights_hash,
            "dtype": loaded.dtype,
            "layers": list(self.layers),
            "pooling": self.pooling,
            "max_tokens": self.max_tokens,
            "tokenizer_hash": self.tokenizer_hash,
            "layer_path": self.resolved_layer_path,
            "activation_site": "residual_stream_after_layer",
        }
        self.fingerprint_id: str = fingerprint_id(self.fingerprint)

        if loaded.weights_loaded:
            self._input_device = self._find_input_device()
            params = inspect.signature(loaded.model.forward).parameters
            self._extra_kwargs = {"use_cache": False} if "use_cache" in params else {}

    @property
    def weights_loaded(self) -> bool:
        """Whether the model's weights are loaded (always, unless built weight-less and nothing forwarded yet)."""
        return self.loaded.weights_loaded

    def load_weights(self) -> LoadedModel:
        """Load the weights of a weight-less engine now (no-op when loaded); returns the loaded model.

        Raises :class:`FingerprintMismatchError` when the loaded model does not
        give the fingerprint the engine was built with (activations cached
        under it would not be this model's).
        """
        with self._load_lock:
            if self.loaded.weights_loaded:
                return self.loaded
            bound = dict(self.__dict__)
            before, before_id = self.fingerprint, self.fingerprint_id
            start = time.perf_counter()
            log.info("%s: loading the model weights (texts to forward)", self.loaded.model_id)
            real = self.loaded.with_weights()
            self._bind(real)
            if self.fingerprint_id != before_id:
                after = self.fingerprint
                self.__dict__.update(bound)  # never forward under a fingerprint other than the one promised
                diff = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
                details = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in diff)
                raise FingerprintMismatchError(
                    f"{real.model_id}: the model loaded with its weights gives another activation fingerprint "
                    f"than the one computed without them ({details}); activations cached under "
                    f"{before_id[:16]} would not be this model's. Pass --layer-path / layer_path, or report this."
                )
            self.stats.device = real.device
            self.stats.load_seconds += time.perf_counter() - start
        if self._on_weights_loaded is not None:
            self._on_weights_loaded(real)
        return real

    def _effective_max_tokens(self, requested: int) -> int:
        cfg = self.loaded.text_config
        # Learned absolute positions cannot go past their table; rotary limits are soft.
        limit = getattr(cfg, "n_positions", None)
        if limit is None and (self.loaded.is_encoder or getattr(cfg, "position_embedding_type", None) == "absolute"):
            limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and requested > int(limit):
            if not hasattr(self, "max_tokens"):  # said once, not again when the weights load
                log.warning("%s: max_tokens %d exceeds the model's %d positions; using %d",
                            self.loaded.model_id, requested, limit, limit)
            return int(limit)
        return requested

    def _prepare_tokenizer(self) -> int:
        tok = self.tokenizer
        tok.padding_side = "right"
        if tok.pad_token_id is None:
            if tok.eos_token is not None:
                # Padding positions are masked out, so reusing EOS changes nothing the model sees.
                tok.pad_token = tok.eos_token
            else:
                return 0
        return int(tok.pad_token_id)

    def _accelerated(self) -> bool:
        """Whether the model runs on an accelerator (where the batch size decides the throughput)."""
        return self._input_device.type != "cpu"

    def _find_input_device(self) -> torch.device:
        if self.loaded.device_map:
            return torch.device(self.loaded.device)  # the embeddings' device (offloaded weights show 'meta')
        try:
            emb = cast(Any, self.loaded.model).get_input_embeddings()  # a transformers PreTrainedModel
            device: torch.device = emb.weight.device
            return device
        except (AttributeError, NotImplementedError):
            param = next(self.loaded.model.parameters())
            return param.device

    # -- forward -------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text as training forwards it (see :func:`~amygdala_dagster.engine.inputs.token_ids`)
        and whether each was cut to ``max_tokens``."""
        return token_ids(self.tokenizer, texts, self.max_tokens)

    def _run_batch(self, ids: list[list[int]], batch: list[int], padded_len: int,
                   keep_tokens: Sequence[bool]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Pooled float32 ``[B, L, H]`` of the batch's texts and, for the rows ``keep_tokens`` marks, the
        per-token activations ``[T, L, H]`` (the model's dtype, padding dropped), both on the CPU."""
        input_ids = torch.full((len(batch), padded_len), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), padded_len), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(ids[i])
            input_ids[row, :n] = torch.tensor(ids[i], dtype=torch.long)
            mask[row, :n] = 1
        input_ids = input_ids.to(self._input_device)
        mask = mask.to(self._input_device)
        pooled: list[torch.Tensor | None] = [None] * len(self.layers)
        hidden: list[torch.Tensor | None] = [None] * len(self.layers)
        wanted = [row for row, i in enumerate(batch) if keep_tokens[i]]

        def keep(slot: int, out: torch.Tensor) -> None:
            # With a device map the blocks sit on several devices: gather on the input device.
            pooled[slot] = pool_hidden(out, mask, self.pooling).to(self._input_device)
            if wanted:
                hidden[slot] = out[wanted].to("cpu")

        run_until_captured(self.loaded.model, self._modules, keep, self._deepest_slot,
                           input_ids=input_ids, attention_mask=mask, **self._extra_kwargs)
        if any(c is None for c in pooled):
            missing = [self.layers[s] for s, c in enumerate(pooled) if c is None]
            raise RuntimeError(f"{self.loaded.model_id}: the forward pass never reached layer(s) "
                               f"{missing} at {self.resolved_layer_path}")
        # Plain tensors (not inference tensors) so callers may modify them in place.
        stacked = torch.stack(pooled, dim=1).cpu().clone()  # type: ignore[arg-type]
        tokens: dict[int, torch.Tensor] = {}
        if wanted:
            per_token = torch.stack(hidden, dim=2)  # type: ignore[arg-type]  # [B', T, L, H]
            for j, row in enumerate(wanted):
                tokens[batch[row]] = per_token[j, : len(ids[batch[row]])].clone()
        return stacked, tokens

    def forward(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None,
                keys: Sequence[str] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(indices into texts, pooled float32 CPU tensor [B, len(layers), hidden])`` per batch.

        Texts are checked and tokenised before anything runs: an empty or
        whitespace-only text raises ValueError naming its key (``keys[i]``)
        or index. Batches come longest text first; ``progress(done_texts,
        done_tokens)`` is called after each batch.
        """
        texts = list(texts)
        if keys is not None and len(keys) != len(texts):
            raise ValueError(f"{len(keys)} keys for {len(texts)} texts")
        reject_empty_texts(texts, keys)
        if not texts:
            return iter(())
        ids, truncated = self.tokenize(texts)
        self.note_truncated(sum(truncated), len(texts))
        return ((batch, pooled) for batch, pooled, _ in self.forward_ids(ids, progress=progress))

    def note_truncated(self, n: int, total: int) -> None:
        """Count (and log) ``n`` of ``total`` texts cut to ``max_tokens``."""
        if n:
            log.info("%d of %d texts truncated to %d tokens", n, total, self.max_tokens)
        self.stats.truncated += int(n)

    def forward_ids(self, ids: Sequence[Sequence[int]], per_token: Sequence[bool] | None = None,
                    progress: Callable[[int, int], None] | None = None,
                    ) -> Iterator[tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]]:
        """Forward token sequences (as :meth:`tokenize` gives them); per batch yield ``(indices, pooled
        float32 [B, L, H], {index: per-token activations [T, L, H]})``, the per-token ones (in the model's
        dtype) for the sequences ``per_token`` marks: pooled and per-token data of a text come out of one
        forward pass. The weights are loaded here when the engine has none yet."""
        seqs = [list(x) for x in ids]
        if not seqs:
            return iter(())
        empty = [i for i, x in enumerate(seqs) if not x]
        if empty:
            raise ValueError(f"sequence #{empty[0]} has no token; nothing to forward through the model")
        keep = [False] * len(seqs) if per_token is None else [bool(x) for x in per_token]
        if len(keep) != len(seqs):
            raise ValueError(f"{len(keep)} per-token flags for {len(seqs)} sequences")
        self.load_weights()
        return self._batches(seqs, keep, progress)

    def _batches(self, ids: list[list[int]], keep: list[bool], progress: Callable[[int, int], None] | None
                 ) -> Iterator[tuple[list[int], torch.Tensor, dict[int, torch.Tensor]]]:
        n = len(ids)
        plen = [padded_length(len(x), self.max_tokens) for x in ids]
        order = sorted(range(n), key=lambda i: (-plen[i], -len(ids[i]), i))
        cap_batch = self.batch_size if self.batch_size is not None else n
        cap_tokens = self.max_batch_tokens
        if self.fast_path.fast_path == "no" and not self._fast_path_warned and self._accelerated():
            self._fast_path_warned = True
            log.warning("%s: its %d linear-attention layers run transformers' reference PyTorch path (kernels "
                        "missing: %s); a Qwen3.5-27B-class model ran 976 tokens/s that way on an H200 against "
                        "11.9k for a full-attention layout. Install them: pip install -e '.[gpu]'",
                        self.loaded.model_id, self.fast_path.linear_attention_layers,
                        ", ".join(self.fast_path.kernels_missing) or "?")
        if self.batch_size is not None and not self._advised and self._accelerated():
            self._advised = True
            advice = batch_size_advice(self.batch_size, [plen[i] for i in order], self.max_batch_tokens)
            if advice:
                log.warning("%s: %s", self.loaded.model_id, advice)
        on_cuda = self._input_device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self._input_device)
        pos = done_texts = done_tokens = 0
        while pos < n:
            padded = plen[order[pos]]
            size = 1
            while (pos + size < n and size < cap_batch and plen[order[pos + size]] == padded
                   and (size + 1) * padded <= cap_tokens):
                size += 1
            batch = order[pos:pos + size]
            start = time.perf_counter()
            oom = False
            try:
                pooled, tokens = self._run_batch(ids, batch, padded, keep)
            except torch.OutOfMemoryError as exc:
                if size == 1:
                    raise ActivationOutOfMemoryError(
                        f"{self.loaded.model_id}: out of memory on {self.loaded.device} with a single text of "
                        f"{padded} tokens (max_tokens={self.max_tokens}, dtype={self.loaded.dtype}); "
                        f"lower max_tokens, use a smaller dtype or a larger device"
                    ) from exc
                oom = True
            if oom:
                # Retry outside the except block so the failed batch's tensors can be freed.
                self.stats.oom_retries += 1
                cap_batch = max(1, size // 2)
                cap_tokens = min(cap_tokens, max(padded, cap_batch * padded))
                log.warning("%s: out of memory on a batch of %d x %d tokens; retrying with at most %d texts",
                            self.loaded.model_id, size, padded, cap_batch)
                gc.collect()
                if on_cuda:
                    torch.cuda.empty_cache()
                continue
            real_tokens = sum(len(ids[i]) for i in batch)
            pos += size
            done_texts += size
            done_tokens += real_tokens
            st = self.stats
            st.texts += size
            st.tokens += real_tokens
            st.batches += 1
            st.seconds += time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(self._input_device) if on_cuda else _peak_rss_bytes()
            st.peak_memory_bytes = max(st.peak_memory_bytes, int(peak))
            if progress is not None:
                progress(done_texts, done_tokens)
            yield list(batch), pooled, tokens
