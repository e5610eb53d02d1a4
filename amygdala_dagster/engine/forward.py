"""The forward work: every text and sequence a run needs, each forwarded at most once.

:func:`ensure_cached` makes sure each text has its pooled activations in the
:class:`~amygdala_dagster.engine.cache.ActivationCache` and each
:class:`TokenSequence` (a calibration text or an evaluation conversation) its
per-token activations in the :class:`~amygdala_dagster.engine.token_cache.TokenCache`.
What the caches lack is forwarded in one pass: a text that needs both its
pooled row and its per-token activations (a held-out text of the calibration
sample) gives both from the same forward. Texts are deduplicated by SHA-256,
sequences by their token ids; results are written as they stream out, so a
killed run resumes from what it wrote.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from tqdm.auto import tqdm

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache, reject_empty_texts, text_sha256
from amygdala_dagster.engine.inputs import Encoded
from amygdala_dagster.engine.token_cache import TokenCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenSequence:
    """An input whose per-token activations are kept: its token ids and, for a plain text, the text's
    SHA-256 (its pooled-cache key, so the pooled row comes out of the same forward)."""

    key: str
    ids: tuple[int, ...]
    text_sha: str | None = None

    @classmethod
    def of(cls, encoded: Encoded, text: str | None = None) -> TokenSequence:
        return cls(key=encoded.key, ids=tuple(encoded.ids), text_sha=text_sha256(text) if text is not None else None)


@dataclass
class CacheRunStats:
    """What one :func:`ensure_cached` call did."""

    texts_total: int
    unique_texts: int
    forwarded: int
    cached: int
    tokens: int
    truncated: int
    seconds: float
    tokens_per_s: float
    peak_memory_bytes: int | None
    device: str
    #: Per-token sequences asked for, and how many of them had to be forwarded.
    sequences: int = 0
    sequences_forwarded: int = 0
    #: Sequences forwarded for their per-token activations alone (their pooled row was cached or not needed).
    extra_forwards: int = 0
    per_token_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_cached(
    engine: ActivationEngine,
    cache: ActivationCache,
    texts: Sequence[str],
    *,
    keys: Sequence[str] | None = None,
    progress: bool = True,
    tokens: TokenCache | None = None,
    sequences: Sequence[TokenSequence] = (),
) -> CacheRunStats:
    """Forward what the caches lack: the pooled row of every text in ``texts`` and, into ``tokens``, the
    per-token activations of every sequence in ``sequences`` -- one forward pass per distinct input.

    Shards holding the texts are checked against their checksums first; a
    damaged one is set aside with a warning and its texts forwarded again.
    ``keys`` (parallel to ``texts``) name the examples in errors; an empty
    text is refused. The weights are loaded only when something is missing.
    """
    if keys is not None and len(keys) != len(texts):
        raise ValueError(f"ensure_cached: {len(keys)} keys for {len(texts)} texts")
    if sequences and tokens is None:
        raise ValueError("ensure_cached: per-token sequences need a token cache")
    reject_empty_texts(texts, keys)
    shas = [text_sha256(t) for t in texts]
    first: dict[str, int] = {}
    for i, sha in enumerate(shas):
        first.setdefault(sha, i)
    cache.refresh()  # shards written by other processes since the cache was opened
    cache.verify(list(first))  # a damaged shard's texts are forwarded again
    pooled_todo = set(cache.missing(list(first)))
    seq_by_key = {s.key: s for s in sequences}
    seq_todo = tokens.missing(seq_by_key) if tokens is not None else []

    # One list of token sequences to forward: per-token ones first (with their pooled row when a text of
    # theirs lacks it), then the texts whose pooled row alone is missing.
    ids: list[list[int]] = []
    per_token: list[bool] = []
    pooled_sha: list[str | None] = []
    seq_key: list[str | None] = []
    for key in seq_todo:
        seq = seq_by_key[key]
        ids.append(list(seq.ids))
        per_token.append(True)
        text_sha = seq.text_sha if seq.text_sha in pooled_todo else None
        pooled_todo.discard(text_sha or "")
        pooled_sha.append(text_sha)
        seq_key.append(key)
    rest = [s for s in first if s in pooled_todo]
    rest_ids, cut = engine.tokenize([texts[first[s]] for s in rest]) if rest else ([], [])
    st0 = engine.stats
    tokens0, trunc0, load0 = st0.tokens, st0.truncated, st0.load_seconds
    engine.note_truncated(sum(cut), len(rest))
    ids += rest_ids
    per_token += [False] * len(rest)
    pooled_sha += rest
    seq_key += [None] * len(rest)
    extra = sum(1 for k, p in zip(seq_key, pooled_sha) if k is not None and p is None)

    per_token_bytes = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(ids), unit="text", desc="forward", file=sys.stderr, dynamic_ncols=True) \
        if progress and ids else None
    try:
        for batch, pooled, per_tok in engine.forward_ids(ids, per_token):
            rows = [j for j, i in enumerate(batch) if pooled_sha[i] is not None]
            if rows:
                cache.add([cast(str, pooled_sha[batch[j]]) for j in rows], pooled[rows])
            for i, hidden in per_tok.items():
                assert tokens is not None  # per-token rows come only for sequences, which need the token cache
                tokens.put(cast(str, seq_key[i]), hidden)
                per_token_bytes += hidden.numel() * 2
            if bar is not None:
                bar.update(len(batch))
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(tok_s=f"{(engine.stats.tokens - tokens0) / elapsed:,.0f}", refresh=False)
    finally:
        # Whatever was forwarded before an error is kept: the next run resumes from it.
        cache.flush()
        if bar is not None:
            bar.close()
    st = engine.stats
    load_seconds = st.load_seconds - load0
    seconds = max(time.perf_counter() - t0 - load_seconds, 0.0) if ids else 0.0
    n_tokens = st.tokens - tokens0
    forwarded_texts = sum(1 for p in pooled_sha if p is not None)
    stats = CacheRunStats(
        texts_total=len(texts), unique_texts=len(first), forwarded=forwarded_texts,
        cached=len(first) - forwarded_texts, tokens=n_tokens, truncated=st.truncated - trunc0,
        seconds=round(seconds, 3), tokens_per_s=round(n_tokens / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_bytes=st.peak_memory_bytes, device=str(st.device or ""),
        sequences=len(seq_by_key), sequences_forwarded=len(seq_todo), extra_forwards=extra,
        per_token_bytes=per_token_bytes,
    )
    log.info(
        "activations: %d texts (%d unique): %d forwarded, %d from cache; %d per-token sequence(s), %d forwarded; "
        "%d tokens (%d texts truncated) in %.1fs (%.0f tokens/s) on %s",
        stats.texts_total, stats.unique_texts, stats.forwarded, stats.cached, stats.sequences,
        stats.sequences_forwarded, stats.tokens, stats.truncated, stats.seconds, stats.tokens_per_s,
        stats.device or "?",
    )
    return stats
