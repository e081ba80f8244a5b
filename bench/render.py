"""Rendering of the reports: jinja2 templates (package data, bench/templates/) and markdown tables by pandas.

HTML templates autoescape everything they print; markdown templates escape every printed value for a markdown
table (``md_cell``: HTML entities, since renderers pass inline HTML through, and pipes) unless it is already
markdown (``Markup``: a table from ``md_table``, a section someone else rendered).
"""

from __future__ import annotations

import functools
import html
from typing import Any, Sequence

from jinja2 import Environment, PackageLoader
from markupsafe import Markup


def md_cell(text: Any) -> str:
    """Markdown table text: HTML-escaped (renderers pass inline HTML through) and pipes escaped."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], escape: bool = True) -> Markup:
    """A GitHub markdown table by pandas (``DataFrame.to_markdown``, tabulate), every cell escaped unless told."""
    import pandas as pd

    cell = md_cell if escape else str
    frame = pd.DataFrame([[cell(c) for c in row] for row in rows], columns=[cell(h) for h in headers])
    return Markup(frame.to_markdown(index=False, tablefmt="github", disable_numparse=True))


def _md_finalize(value: Any) -> Any:
    if value is None:
        return ""
    return value if isinstance(value, Markup) else md_cell(value)


@functools.lru_cache(maxsize=None)
def environment(kind: str) -> Environment:
    """The "html" (autoescaped) or "md" (markdown-escaped) template environment."""
    loader = PackageLoader("bench", "templates")
    common = dict(loader=loader, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    if kind == "html":
        return Environment(autoescape=True, **common)
    return Environment(autoescape=False, finalize=_md_finalize, **common)


def render(template: str, **context: Any) -> str:
    """Render ``bench/templates/<template>``: ``*.html.j2`` autoescaped, ``*.md.j2`` markdown-escaped."""
    kind = "html" if template.endswith(".html.j2") else "md"
    return environment(kind).get_template(template).render(**context)
