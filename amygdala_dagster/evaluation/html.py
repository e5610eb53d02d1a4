"""The one place that renders HTML: a Jinja2 environment over ``evaluation/templates``.

The report (:mod:`.report`, with its runtime section :mod:`.runtime_report`)
and the trace page (:mod:`.trace`) build plain data (dicts and lists) and
render it through :func:`render`; the templates hold the markup and extend one
base layout (``base.html.j2``: head, stylesheet, page frame). Autoescaping is
on for ``*.html.j2``; the stylesheets and the script (``*.css``, ``*.js``)
are included verbatim.

Filters: ``num`` (:func:`number`), ``data_uri`` (:func:`png_data_uri`),
``script_json`` (:func:`script_json`) and ``inert`` (:func:`inert`), which every
text from input goes through: a bidirectional control character in it (a
token piece, a conversation id, a snippet, an emotion name) is shown as a
marker instead of reordering what the reader sees. The templates apply it
where such text is element content; the environment's ``finalize`` applies its
attribute form to every other string a template outputs, so that none that a
template forgot can carry a raw control into the page.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import unicodedata
from typing import Any

import jinja2
from markupsafe import Markup, escape

#: Bidirectional formatting characters (embeddings, overrides, isolates, marks): raw in a page they
#: reorder the text around them, so that what a reader sees is not what the input says.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_BIDI = re.compile(f"[{BIDI_CONTROLS}]")


def number(x: object, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals when a float, as is otherwise; "–" for None and non-finite floats."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "–"
    return str(x)


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI: the report embeds its plots, so the file stands alone."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def script_json(value: object) -> Markup:
    """Compact JSON for a ``<script type="application/json">`` element; ``</`` is escaped so that no
    string in it can close the element."""
    return Markup(json.dumps(value, separators=(",", ":")).replace("</", "<\\/"))


def bidi_marker(ch: str) -> str:
    """The visible stand-in of one control character, e.g. ``⟨U+202E⟩``."""
    return f"⟨U+{ord(ch):04X}⟩"


def inert(value: object, attribute: bool = False) -> Markup:
    """``value`` as escaped text in which every bidirectional control is replaced by its marker
    (:func:`bidi_marker`): in element content a ``<span class="bidi">`` with the character's name as its
    title and ``dir="ltr"`` (isolated, so that it reads the same in right-to-left text); with
    ``attribute=True`` (an attribute value, ``<option>``, SVG text) the marker text alone."""
    text = str(value)
    if not _BIDI.search(text):
        return value if isinstance(value, Markup) else escape(text)
    if isinstance(value, Markup):  # already markup (a macro's output): a span could land in an attribute
        return Markup(_BIDI.sub(lambda m: bidi_marker(m.group()), text))
    parts: list[Markup] = []
    pos = 0
    for m in _BIDI.finditer(text):
        ch = m.group()
        parts.append(escape(text[pos:m.start()]))
        parts.append(escape(bidi_marker(ch)) if attribute else Markup(
            '<span class="bidi" dir="ltr" title="{}">{}</span>').format(
                f"U+{ord(ch):04X} {unicodedata.name(ch, '')}".strip(), bidi_marker(ch)))
        pos = m.end()
    parts.append(escape(text[pos:]))
    return Markup("").join(parts)


def _finalize(value: Any) -> Any:
    return inert(value, attribute=True) if isinstance(value, str) and _BIDI.search(value) else value


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The shared environment (templates shipped as package data under ``evaluation/templates``)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("amygdala_dagster.evaluation", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=True, default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.filters.update(num=number, data_uri=png_data_uri, script_json=script_json, inert=inert)
    return env


def render(template: str, **context: Any) -> str:
    """Render the template named ``template`` with ``context``."""
    return environment().get_template(template).render(**context)


def render_macro(template: str, macro: str, *args: Any, **kwargs: Any) -> str:
    """Call one macro of a template (a fragment of a page, e.g. the report's runtime section)."""
    return str(getattr(environment().get_template(template).module, macro)(*args, **kwargs))
