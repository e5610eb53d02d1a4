"""A bounded sample of inputs whose per-token activations are kept: what it holds and how it is chosen.

Two samples serve the per-token view of the readout: the calibration sample
(held-out texts of the graph, or the ``--calibration-texts`` records) and the
evaluation conversations. :func:`select_sample` tokenises the candidates in a
stable order and keeps them while their tokens fit the budget (at least one),
so a sample's size is bounded whatever the size of the graph. A
:class:`TokenSample` is what the GPU step writes for the steps after it (JSON):
per entry the input's id, its sequence key in the per-token cache, which
positions are special tokens, whether it was cut to ``max_tokens`` and, for
display, its token strings and pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from amygdala_dagster.engine.forward import TokenSequence
from amygdala_dagster.engine.inputs import Encoded, Item, encode, special_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Default token budget of each sample (calibration texts; evaluation conversations).
DEFAULT_SAMPLE_TOKENS = 8192


@dataclass
class SampleEntry:
    """One input of a sample. ``text_sha`` is set for a plain text (its pooled-cache key)."""

    id: str
    key: str
    special: list[bool]
    truncated: bool = False
    #: Tokens of the whole input when it was cut (counted for display entries).
    tokens_total: int | None = None
    text_sha: str | None = None
    emotions: list[str] | None = None
    #: For display (evaluation conversations): token ids, token strings and each token's piece of the text.
    ids: list[int] | None = None
    tokens: list[str] | None = None
    pieces: list[str] | None = None

    def __len__(self) -> int:
        return len(self.special)

    def encoded(self) -> Encoded:
        """The entry as the runtime's :class:`~amygdala_dagster.engine.inputs.Encoded`."""
        return Encoded(ids=list(self.ids or []), special=list(self.special), tokens=list(self.tokens or []),
                       pieces=list(self.pieces or []), truncated=self.truncated,
                       n_tokens_total=self.tokens_total if self.tokens_total is not None else len(self.special))


@dataclass
class TokenSample:
    """The inputs whose per-token activations are kept, chosen under a token budget."""

    source: str
    budget: int
    entries: list[SampleEntry] = field(default_factory=list)
    #: Inputs offered, and the ones left out because the budget was full.
    candidates: int = 0
    left_out: int = 0
    #: Sequences with their token ids, for the forward pass (not serialised: the entries say what was kept).
    sequences: list[TokenSequence] = field(default_factory=list, repr=False)

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.entries)

    @property
    def truncated(self) -> int:
        return sum(1 for e in self.entries if e.truncated)

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def summary(self) -> dict[str, Any]:
        """Counts for logs and metadata."""
        return {"source": self.source, "texts": len(self.entries), "tokens": self.tokens, "budget": self.budget,
                "candidates": self.candidates, "left_out": self.left_out, "truncated": self.truncated}

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "budget": self.budget, "candidates": self.candidates,
                "left_out": self.left_out,
                "entries": [{k: v for k, v in asdict(e).items() if v is not None} for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSample:
        return cls(source=str(data["source"]), budget=int(data["budget"]),
                   candidates=int(data.get("candidates", 0)), left_out=int(data.get("left_out", 0)),
                   entries=[SampleEntry(**e) for e in data.get("entries", [])])


def stable_order(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(id, text)`` pairs ordered by the SHA-256 of the text: an order adding texts does not reshuffle."""
    return sorted(items, key=lambda kv: (hashlib.sha256(kv[1].encode("utf-8")).hexdigest(), kv[0]))


def select_sample(tokenizer: PreTrainedTokenizerBase, max_tokens: int, candidates: Sequence[tuple[str, Item]],
                  budget: int, *, source: str, labels: Mapping[str, Sequence[str]] | None = None, display: bool = False
                  ) -> TokenSample:
    """Tokenise ``candidates`` (``(id, text or messages)``, in the order given) until their tokens fill
    ``budget`` (the first input is always kept); ``labels`` adds each input's emotions; ``display`` keeps
    token strings and pieces (for conversations shown in the report)."""
    if int(budget) < 1:
        raise ValueError(f"token budget must be at least 1, got {budget}")
    specials = special_ids(tokenizer)
    sample = TokenSample(source=source, budget=int(budget), candidates=len(candidates))
    used = 0
    for pos, (rid, item) in enumerate(candidates):
        enc = encode(tokenizer, item, max_tokens, specials=specials, pieces=display)
        if sample.entries and used + len(enc) > budget:
            sample.left_out = len(candidates) - pos
            break
        used += len(enc)
        text = item if isinstance(item, str) else None
        seq = TokenSequence.of(enc, text)
        sample.sequences.append(seq)
        sample.entries.append(SampleEntry(
            id=str(rid), key=seq.key, special=list(enc.special), truncated=enc.truncated, text_sha=seq.text_sha,
            tokens_total=enc.n_tokens_total if enc.truncated else None,
            emotions=list(labels[rid]) if labels is not None and rid in labels else None,
            ids=list(enc.ids) if display else None, tokens=list(enc.tokens) if display else None,
            pieces=list(enc.pieces) if display else None))
    return sample
