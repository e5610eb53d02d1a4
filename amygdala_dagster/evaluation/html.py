"""The one place that renders HTML: a Jinja2 environment over ``evaluation/templates``.

The report (:mod:`.report`, with its runtime section :mod:`.runtime_report`)
and the trace page (:mod:`.trace`) build plain data (dicts and lists) and
render it through :func:`render`; the templates hold the markup and extend one
base layout (``base.html.j2``: head, stylesheet, page frame). Autoescaping is
on for ``*.html.j2``; the stylesheets and the script (``*.css``, ``*.js``)
are included verbatim.

Filters: ``num`` (:func:`number`), ``data_uri`` (:func:`png_data_uri`),
``script_json`` (:func:`script_json`).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from typing import Any

import jinja2
from markupsafe import Markup


def number(x: Any, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals when a float, as is otherwise; "–" for None and non-finite floats."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "–"
    return str(x)


def png_data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI: the report embeds its plots, so the file stands alone."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def script_json(value: Any) -> Markup:
    """Compact JSON for a ``<script type="application/json">`` element; ``</`` is escaped so that no
    string in it can close the element."""
    return Markup(json.dumps(value, separators=(",", ":")).replace("</", "<\\/"))


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
    )
    env.filters.update(num=number, data_uri=png_data_uri, script_json=script_json)
    return env


def render(template: str, **context: Any) -> str:
    """Render the template named ``template`` with ``context``."""
    return environment().get_template(template).render(**context)


def render_macro(template: str, macro: str, *args: Any, **kwargs: Any) -> str:
    """Call one macro of a template (a fragment of a page, e.g. the report's runtime section)."""
    return str(getattr(environment().get_template(template).module, macro)(*args, **kwargs))
