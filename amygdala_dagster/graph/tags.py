"""Tag-line parsing and emotion names (Contract 1).

:func:`parse_tags` turns node content into body text, emotion scores and a
malformed-token count. :func:`normalize_emotion_name` is the one definition of
an emotion name, used by the parser, selection, partitions and file names.

The tag block is the run of trailing lines of a node's content in which every
whitespace-separated token has the form ``name:value``. Scanning starts at the
last line and stops at the first non-blank line that is not of that form.
Blank lines inside the trailing run are skipped rather than ending it: a body
must never end in a tag line, and parsing a body again must return it unchanged.
"""

from __future__ import annotations

import re
import unicodedata
from typing import NamedTuple

# A token "of the form name:value": exactly one colon, no whitespace. Whether the
# name and value are *valid* is decided afterwards, so `:5` or `joy:high` still
# make their line part of the tag block (and are counted as malformed).
_TOKEN_FORM = re.compile(r"^([^\s:]*):([^\s:]*)$")
_VALUE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")


MAX_NAME_LENGTH = 64
"""Characters in a normalised name: it becomes a Dagster partition key and a directory name."""
MAX_NAME_BYTES = 192
"""UTF-8 bytes in a normalised name (64 characters of the Basic Multilingual Plane), so a
file name made of it plus a suffix stays under the usual 255-byte limit."""
NAME_RULE = (
    "after NFKC normalisation and case folding, a name must hold only letters of any script "
    "(with their combining marks), digits, '_' and '-', start with a letter, and have at most "
    f"{MAX_NAME_LENGTH} characters ({MAX_NAME_BYTES} UTF-8 bytes)"
)


def fold_text(text: str) -> str:
    """``text`` normalised as names are: NFKC, case-folded, NFKC again.

    The second NFKC recomposes what case folding decomposed (``"É".casefold()`` is
    already composed, but folding can yield sequences NFKC changes), so the result
    is a fixed point: folding it again changes nothing. Body text is folded the
    same way before looking for whole-word mentions of a name.
    """
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def _is_name_char(ch: str) -> bool:
    if ch in "_-":
        return True
    cat = unicodedata.category(ch)
    # Combining marks (M*) belong to the letter they follow: the dot of a case-folded
    # 'İ' (i + U+0307), Devanagari and Thai vowel signs.
    return cat[0] in "LM" or cat == "Nd"


def normalize_emotion_name(raw: object) -> str | None:
    """The normalised emotion name for ``raw`` (see :data:`NAME_RULE`), or None if it is not one."""
    if not isinstance(raw, str):
        return None
    name = fold_text(raw)
    if not name or len(name) > MAX_NAME_LENGTH or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return None
    if unicodedata.category(name[0])[0] != "L" or not all(_is_name_char(c) for c in name):
        return None
    return name


def check_emotion_name(name: str) -> str:
    """``name`` (surrounding whitespace ignored) normalised; ValueError naming the name and the rule.

    Valid names are also safe directory names: no separator, no leading dot, no NUL.
    """
    if not isinstance(name, str):
        raise ValueError(f"emotion name must be a string, got {name!r}")
    normalized = normalize_emotion_name(name.strip())
    if normalized is None:
        shown = repr(name) if len(name) <= 80 else f"{name[:80]!r}... ({len(name)} characters)"
        raise ValueError(f"invalid emotion name {shown}: {NAME_RULE}")
    return normalized


class ParsedContent(NamedTuple):
    body: str
    """The text given to the model: content without the tag block, trimmed."""
    scores: dict[str, float]
    """Normalised emotion name -> score in [0, 10]; the maximum over tag lines."""
    malformed: int
    """Tokens in the tag block that were dropped (bad name or value)."""


def _tag_tokens(line: str) -> list[tuple[str, str]] | None:
    """The (name, value) tokens of a tag line, or None if ``line`` is not one."""
    tokens = line.split()
    if not tokens:
        return None
    pairs = []
    for tok in tokens:
        m = _TOKEN_FORM.match(tok)
        if m is None:
            return None
        pairs.append((m.group(1), m.group(2)))
    return pairs


def is_tag_line(line: str) -> bool:
    return _tag_tokens(line) is not None


def parse_score(value: str) -> float | None:
    if not _VALUE.match(value):
        return None
    score = float(value)
    return score if 0.0 <= score <= 10.0 else None


def parse_tags(content: str) -> ParsedContent:
    """Split node content into model text and tags. Never raises on any string."""
    lines = content.splitlines()
    scores: dict[str, float] = {}
    malformed = 0
    cut = len(lines)
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if not line.strip():
            continue
        pairs = _tag_tokens(line)
        if pairs is None:
            break
        cut = i
        for raw_name, value in pairs:
            score = parse_score(value)
            name = normalize_emotion_name(raw_name)
            if name is None or score is None:
                malformed += 1
                continue
            if score > scores.get(name, -1.0):
                scores[name] = score
    body = "\n".join(lines[:cut]).strip()
    return ParsedContent(body, dict(sorted(scores.items())), malformed)
