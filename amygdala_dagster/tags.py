"""Tag-line parsing (Contract 1): node content -> body text, emotion scores, malformed count.

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
_NAME = re.compile(r"^[\w-]+$")
_VALUE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")


class ParsedContent(NamedTuple):
    body: str
    """The text given to the model: content without the tag block, trimmed."""
    scores: dict[str, float]
    """Emotion name (lower-cased) -> score in [0, 10]; the maximum over tag lines."""
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
        for name, value in pairs:
            score = parse_score(value)
            name = unicodedata.normalize("NFC", name)
            if not (_NAME.match(name) and name[0].isalpha()) or score is None:
                malformed += 1
                continue
            name = name.lower()
            if score > scores.get(name, -1.0):
                scores[name] = score
    body = "\n".join(lines[:cut]).strip()
    return ParsedContent(body, dict(sorted(scores.items())), malformed)
