"""What can be forwarded, and how it becomes token ids: texts, conversations, and the JSONL files holding them.

An input is a text or a conversation (chat messages ``[{"role", "content"}, ...]``).
:func:`read_inputs` reads the JSONL files of ``--calibration-texts``,
``--eval-conversations`` and ``amygdala trace --input`` (one ``{"text"}`` or
``{"messages"}`` per line, optional ``"id"``, labelled files add
``"emotions"``), naming file and line in every error.

:func:`token_ids` is how training tokenises a text (special tokens added,
cut to ``max_tokens``) without tokenising a multi-megabyte text whole;
:func:`encode` gives the same ids for a text and runs a conversation through
the tokenizer's chat template, with which positions are special tokens and
(for display) each token's piece of the text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from amygdala_dagster.files.jsonio import jsonl_objects

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, str]
#: A text, or a conversation as chat messages ``[{"role", "content"}, ...]``.
Item = str | Sequence[Message]

#: Characters tokenised per token of ``max_tokens`` before looking further into a long text
#: (English averages ~4 characters per token; a text denser than this is re-read with a longer prefix).
CHARS_PER_TOKEN = 16
#: Tokens beyond ``max_tokens`` a prefix must give before its first ``max_tokens`` are taken as the text's.
TOKEN_MARGIN = 16


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
    #: Whether the input was cut to ``max_tokens``.
    truncated: bool = False
    #: Tokens of the whole input, before the cut to ``max_tokens`` (None: not counted).
    n_tokens_total: int | None = None

    @property
    def key(self) -> str:
        """Content address of the token sequence (the token-activation cache key)."""
        return hashlib.sha256(json.dumps(self.ids, separators=(",", ":")).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.ids)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens, including special added tokens (chat markers)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for idx, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int, *,
              add_special_tokens: bool = True) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each text, cut to ``max_tokens``, and whether each text was cut.

    Only a prefix of a long text is tokenised (a suffix for a tokenizer
    that truncates on the left): ``max_tokens * CHARS_PER_TOKEN`` characters, grown (x4) for a text whose
    prefix does not give ``max_tokens + TOKEN_MARGIN`` tokens. The margin keeps the cut's effect on the
    last pre-token beyond the tokens kept, so the ids are those of the whole text (a 5 MB node is not
    tokenised whole just to learn that it is longer than ``max_tokens``).
    """
    limit = int(max_tokens)
    ids: list[list[int] | None] = [None] * len(texts)
    truncated = [False] * len(texts)
    cap = limit * CHARS_PER_TOKEN
    todo = list(range(len(texts)))
    # A tokenizer that truncates on the left keeps the end of a text: read a suffix instead.
    from_end = getattr(tokenizer, "truncation_side", "right") == "left"
    while todo:
        heads = [texts[i][-cap:] if from_end else texts[i][:cap] for i in todo]
        enc = tokenizer(heads, truncation=True, max_length=limit, add_special_tokens=add_special_tokens,
                        padding=False, verbose=False)["input_ids"]
        at_limit = [j for j, x in enumerate(enc) if len(x) >= limit]
        counts: dict[int, int] = {}
        if at_limit:
            full = tokenizer([heads[j] for j in at_limit], truncation=False, add_special_tokens=add_special_tokens,
                             padding=False, verbose=False)["input_ids"]
            counts = {j: len(x) for j, x in zip(at_limit, full)}
        retry = []
        for j, i in enumerate(todo):
            cut = len(texts[i]) > cap
            n = counts.get(j, len(enc[j]))
            if cut and n < limit + TOKEN_MARGIN:
                retry.append(i)  # fewer tokens in the prefix than needed to be sure: take a longer one
                continue
            ids[i] = [int(t) for t in enc[j]]
            truncated[i] = bool(cut or n > limit)
        todo = retry
        cap *= 4
    return ids, truncated  # type: ignore[return-value]  # every slot filled by the loop


def render(tokenizer: PreTrainedTokenizerBase, item: Item, *, add_generation_prompt: bool = False) -> tuple[str, bool]:
    """``(text, add_special_tokens)``: a text as it is, or a conversation through the tokenizer's chat
    template (which places the special tokens itself), else as plain ``role: content`` lines."""
    if isinstance(item, str):
        return item, True
    messages = [dict(m) for m in item]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return cast(str, text), False
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + ("\nassistant:" if add_generation_prompt else ""), True


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool,
              max_tokens: int | None) -> tuple[list[int], list[tuple[int, int]], int]:
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


def _pieces(tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], offsets: list[tuple[int, int]],
            special: list[bool]) -> list[str]:
    """The text each token covers, with the gap before it, so that the pieces read as the text."""
    tokens = cast(list[str], tokenizer.convert_ids_to_tokens(ids))
    if len(offsets) != len(ids):
        return [tokens[i] if special[i] else str(tokenizer.decode([t])) for i, t in enumerate(ids)]
    out, cursor = [], 0
    for i, (start, end) in enumerate(offsets):
        if special[i] or end <= start:
            out.append(tokens[i] if special[i] else "")
            continue
        out.append(text[cursor:end] if start >= cursor else text[start:end])
        cursor = max(cursor, end)
    return out


def encode(tokenizer: PreTrainedTokenizerBase, item: Item, max_tokens: int | None = None, *,
           add_generation_prompt: bool = False, specials: set[int] | None = None, pieces: bool = True) -> Encoded:
    """Tokenise a text as training does (special tokens added) or a conversation through the tokenizer's
    chat template (see :func:`render`); cut to ``max_tokens``. ``pieces=False`` skips the display strings
    (and tokenises only a prefix of a long input, as :func:`token_ids`); with them,
    :attr:`Encoded.n_tokens_total` keeps the whole input's count."""
    text, add_special = render(tokenizer, item, add_generation_prompt=add_generation_prompt)
    specials = special_ids(tokenizer) if specials is None else specials
    if not pieces and max_tokens is not None:
        (ids,), (cut,) = token_ids(tokenizer, [text], max_tokens, add_special_tokens=add_special)
        return Encoded(ids=ids, special=[i in specials for i in ids], tokens=[], truncated=cut)
    ids, offsets, total = _tokenize(tokenizer, text, add_special, max_tokens)
    ids = [int(i) for i in ids]
    special = [i in specials for i in ids]
    return Encoded(ids=ids, special=special, tokens=list(tokenizer.convert_ids_to_tokens(ids)),
                   pieces=_pieces(tokenizer, text, ids, offsets, special), truncated=total > len(ids),
                   n_tokens_total=total)
