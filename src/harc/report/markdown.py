"""The Markdown renderer: the same document tree as the HTML, with the PNGs beside the file.

Text is HTML-escaped (Markdown viewers render inline HTML), pipes are escaped in table cells, and
generations sit in code fences longer than any backtick run inside them.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from harc.report.html import meta_line, title
from harc.report.tree import Cards, Cell, Code, Details, Figure, Grid, Section, Table, Text


def _md(s: Any) -> str:
    """Escape for a Markdown table cell: HTML entities, pipes, no line breaks."""
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_cell(c: Cell) -> str:
    text = f"**{_md(c.text)}**" if c.cls == "strong" else _md(c.text)
    return f"{text} {_md(c.sub)}" if c.sub else text


def _block(b, out: list[str]) -> None:
    if isinstance(b, Table):
        if b.caption:
            out.append(f"*{_md(b.caption)}*\n")
        out.append("| " + " | ".join(_md(h) for h in b.headers) + " |")
        out.append("|" + "|".join("---:" if n else "---" for n in b.numeric) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        out.append("")
    elif isinstance(b, Text):
        out.append((f"*{_md(b.text)}*" if b.muted else _md(b.text)) + "\n")
    elif isinstance(b, Code):
        runs = [len(m) for m in re.findall(r"`+", b.text)]
        fence = "`" * max(3, max(runs, default=0) + 1)
        out += [fence + "text", b.text, fence, ""]
    elif isinstance(b, Figure):
        out.append(f"![{_md(b.alt)}]({b.name}.png)\n")
        if b.caption:
            out.append(f"*{_md(b.caption)}*\n")
    elif isinstance(b, Grid):
        for f in b.items:
            _block(f, out)
    elif isinstance(b, Details):
        out += [f"<details><summary>{html.escape(b.summary)}</summary>", ""]
        for x in b.blocks:
            _block(x, out)
        out += ["</details>", ""]
    elif isinstance(b, Cards):
        out += [f"- **{_md(lab)}**: {_md(val)}" + (f" ({_md(note)})" if note else "")
                for lab, val, note in b.items]
        out.append("")
    else:
        raise TypeError(f"unknown block {type(b).__name__}")


def render_markdown(res: Mapping, cards: Cards | None, sections: list[Section]) -> str:
    out = [f"# {_md(title(res))}", "", f"*{_md(meta_line(res))}*", ""]
    if cards:
        _block(cards, out)
    for s in sections:
        out += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            _block(b, out)
    return "\n".join(out).rstrip() + "\n"
