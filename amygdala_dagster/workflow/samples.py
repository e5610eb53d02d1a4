"""The per-token samples of a run: what the GPU step forwards per token and what the steps after it read.

:class:`RunSamples` holds the calibration sample (held-out texts of the graph, or
the ``--calibration-texts`` records) and the labelled evaluation conversations;
:func:`forward_run` forwards every input once; :class:`StoredSamples` is the
samples file as the CPU steps read it (no model needed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amygdala_dagster.engine.activations import ActivationEngine
from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.forward import CacheRunStats, TokenSequence, ensure_cached
from amygdala_dagster.engine.inputs import InputRecord
from amygdala_dagster.engine.token_cache import TokenCache
from amygdala_dagster.engine.token_sample import DEFAULT_SAMPLE_TOKENS, TokenSample, select_sample, stable_order
from amygdala_dagster.examples.selection import ExampleSet
from amygdala_dagster.readout.token_calibration import SOURCE_HOLDOUT_TEXTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass
class RunSamples:
    """The inputs a run keeps per token: the calibration sample and the labelled evaluation conversations."""

    calibration: TokenSample
    conversations: TokenSample | None = None

    def sequences(self) -> list[TokenSequence]:
        return [*self.calibration.sequences, *(self.conversations.sequences if self.conversations else [])]

    def keys(self) -> list[str]:
        return [*self.calibration.keys(), *(self.conversations.keys() if self.conversations else [])]

    def to_json(self, engine: ActivationEngine, cache_root: str | os.PathLike[str]) -> str:
        """The samples file: both samples and where their per-token activations live (no model needed to read)."""
        return json.dumps({
            "format": "amygdala-token-samples/1", "fingerprint": dict(engine.fingerprint),
            "fingerprint_id": engine.fingerprint_id, "dtype": engine.loaded.dtype, "cache_root": str(cache_root),
            "layers": [int(x) for x in engine.layers],
            "calibration": self.calibration.to_dict(),
            "conversations": self.conversations.to_dict() if self.conversations else None,
        }, indent=1, sort_keys=True) + "\n"


@dataclass
class StoredSamples:
    """A samples file as the steps after the GPU step read it."""

    calibration: TokenSample
    conversations: TokenSample | None
    tokens: TokenCache
    layers: list[int]
    fingerprint: dict[str, Any]

    @classmethod
    def from_json(cls, text: str) -> StoredSamples:
        data = json.loads(text)
        conv = data.get("conversations")
        return cls(calibration=TokenSample.from_dict(data["calibration"]),
                   conversations=TokenSample.from_dict(conv) if conv else None,
                   tokens=TokenCache(data["cache_root"], data["fingerprint"], data["dtype"]),
                   layers=[int(x) for x in data["layers"]], fingerprint=dict(data["fingerprint"]))


def calibration_sample(tokenizer: PreTrainedTokenizerBase, max_tokens: int, budget: int = DEFAULT_SAMPLE_TOKENS, *,
                       records: Sequence[InputRecord] | None = None, records_name: str | None = None,
                       holdout: Sequence[tuple[str, str]] = ()) -> TokenSample:
    """The calibration sample: ``records`` (``--calibration-texts``, in file order) or the held-out texts
    ``(key, text)`` in a stable order (by content hash), under a ``budget`` of tokens. A record's optional
    ``"emotions"`` are kept: the episode rule of a concept leaves out the records labelled with it."""
    if records is not None:
        source = f"calibration_texts:{records_name}" if records_name else "calibration_texts"
        sample = select_sample(tokenizer, max_tokens, [(r.id, r.item) for r in records], budget, source=source,
                               labels={r.id: r.emotions for r in records if r.emotions is not None})
    else:
        sample = select_sample(tokenizer, max_tokens, stable_order(holdout), budget, source=SOURCE_HOLDOUT_TEXTS)
    _log_sample("calibration", sample)
    return sample


def conversation_sample(tokenizer: PreTrainedTokenizerBase, max_tokens: int, records: Sequence[InputRecord], name: str,
                        budget: int = DEFAULT_SAMPLE_TOKENS) -> TokenSample:
    """The labelled evaluation conversations (in file order) under a ``budget`` of tokens, kept for display."""
    sample = select_sample(tokenizer, max_tokens, [(r.id, r.item) for r in records], budget,
                           source=f"conversations:{name}", labels={r.id: r.emotions or [] for r in records},
                           display=True)
    _log_sample("evaluation conversations", sample)
    return sample


def _log_sample(what: str, sample: TokenSample) -> None:
    s = sample.summary()
    log.info("per-token sample (%s): %d of %d inputs, %d tokens (budget %d)%s%s", what, s["texts"],
             s["candidates"], s["tokens"], s["budget"],
             f"; {s['left_out']} left out by the budget" if s["left_out"] else "",
             f"; {s['truncated']} cut to the token limit" if s["truncated"] else "")


def forward_run(engine: ActivationEngine, cache: ActivationCache, texts: Sequence[str], keys: Sequence[str] | None,
                samples: RunSamples, *, progress: bool = True) -> CacheRunStats:
    """Every text's pooled row (into ``cache``) and the samples' per-token activations (into the per-token
    cache beside it), each input forwarded at most once; then per-token files no sample uses any more are
    pruned (see :meth:`~amygdala_dagster.engine.token_cache.TokenCache.prune`)."""
    tokens = TokenCache(cache.root, engine.fingerprint, engine.loaded.dtype)
    stats = ensure_cached(engine, cache, texts, keys=keys, progress=progress, tokens=tokens,
                          sequences=samples.sequences())
    tokens.prune(samples.keys())
    return stats


def held_out_negatives(example_sets: Mapping[str, ExampleSet]) -> list[tuple[str, str]]:
    """``(key, text)`` of every emotion's held-out negatives, each node once: the calibration candidates
    when only an examples directory is at hand (no snapshot)."""
    out: dict[str, str] = {}
    for s in example_sets.values():
        for ex in s.holdout_negatives:
            out.setdefault(ex.key, ex.text)
    return list(out.items())
