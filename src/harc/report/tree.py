"""The report's document tree (sections of tables, figures, text, collapsed details) and the
formatting of its cells. Built once by the section builders, rendered twice (`harc.report.html`,
`harc.report.markdown`), so the HTML and the Markdown always hold the same numbers.

Text here is plain: escaping is the renderers' job, so nothing from results.json can become markup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harc.errors import HarcError
from harc.eval.results import _num, cell_rate, run_label


@dataclass
class Cell:
    text: str
    sub: str = ""  # secondary detail (interval, counts): small grey text
    cls: str = ""  # "better" / "worse" / "strong" / "mono": styling only, the text carries meaning
    num: bool = False  # right-aligned with tabular digits

    @property
    def classes(self) -> str:
        return " ".join(c for c in (self.cls, "num" if self.num else "") if c)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    kind = "table"

    def __post_init__(self):
        self.rows = [[c if isinstance(c, Cell) else Cell(str(c)) for c in row] for row in self.rows]

    @property
    def numeric(self) -> list[bool]:
        """A column whose body cells are all numeric is right-aligned, header included."""
        return [bool(self.rows) and all(r[i].num for r in self.rows if i < len(r))
                for i in range(len(self.headers))]

    @property
    def columns(self) -> list[tuple[str, bool]]:
        """(header, numeric) per column."""
        return list(zip(self.headers, self.numeric, strict=True))


@dataclass
class Text:
    text: str
    muted: bool = False
    kind = "text"


@dataclass
class Code:
    text: str
    kind = "code"


@dataclass
class Figure:
    name: str  # PNG file stem beside report.md
    png: bytes
    alt: str
    caption: str = ""
    dpi: int = 150
    kind = "figure"

    @property
    def data_uri(self) -> str:
        from harc.report.plots import png_data_uri

        return png_data_uri(self.png)

    @property
    def css_size(self) -> tuple[int, int]:
        """Shown at 100 CSS px per figure inch (sharp on HiDPI screens), so every plot's text
        appears at the same size whatever the figure's width. Pixels from the PNG IHDR chunk."""
        w, h = int.from_bytes(self.png[16:20], "big"), int.from_bytes(self.png[20:24], "big")
        return round(w * 100 / self.dpi), round(h * 100 / self.dpi)


@dataclass
class Grid:  # figures side by side in the HTML, one after another in Markdown
    items: list[Figure]
    kind = "grid"


@dataclass
class Cards:  # headline numbers
    items: list[tuple[str, str, str]]  # (label, value, note)
    kind = "cards"


@dataclass
class Details:
    summary: str
    blocks: list
    open: bool = False
    kind = "details"


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def figures(sections: list[Section]) -> list[Figure]:
    """Every figure of the document, in reading order."""
    found: list[Figure] = []

    def walk(blocks):
        for b in blocks:
            if isinstance(b, Figure):
                found.append(b)
            elif isinstance(b, Grid):
                walk(b.items)
            elif isinstance(b, Details):
                walk(b.blocks)

    for s in sections:
        walk(s.blocks)
    return found


# ---------------------------------------------------------------------------------------------
# Formatting


def pct(v: float | None, d: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{d}f}%"


def fnum(v, d: int = 3) -> str:
    v = _num(v)
    return "—" if v is None else f"{v:.{d}f}"


def dur(s) -> str:
    s = _num(s)
    if s is None:
        return "—"
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def rate_cell(cell: Mapping | None, rate_key="asr", count_key="success") -> Cell:
    rate, lo, hi = cell_rate(cell, rate_key, count_key)
    if rate is None:
        return Cell("—", num=True)
    sub = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
    k, n = (cell or {}).get(count_key), (cell or {}).get("n")
    if k is not None and n is not None:
        sub += f" {k}/{n}"
    return Cell(pct(rate), sub.strip(), num=True)


def delta_cell(a: float | None, b: float | None, lower_better: bool, unit: str = "pp",
               scale: float = 100.0, d: int = 1) -> Cell:
    """b - a; class marks the direction that is an improvement for this metric."""
    if a is None or b is None:
        return Cell("—", num=True)
    diff = (b - a) * scale
    if abs(diff) < 0.5 * 10 ** (-d):  # rounds to zero: neither better nor worse
        return Cell(f"{0:.{d}f} {unit}".strip(), num=True)
    better = (diff < 0) == lower_better
    text = f"{diff:+.{d}f} {unit}".strip().replace("-", "−")  # typographic minus
    return Cell(text, cls="better" if better else "worse", num=True)


def runs_of(res: Mapping) -> list[dict]:
    runs = res.get("runs")
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def delta_headers(runs: list[dict]) -> list[str]:
    return [f"Δ {run_label(r)} vs {run_label(runs[0])}" for r in runs[1:]]


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "x"


def figure(name: str, build: Callable[[], Any], alt: str, caption: str = "") -> Figure | None:
    """Draw one plot; None when its data is absent (HarcError from the plot: nothing to draw)."""
    from harc.report import plots  # matplotlib loads only when a report is drawn

    try:
        fig = build()
    except HarcError:
        return None
    return Figure(name, plots.fig_to_png_bytes(fig), alt, caption, dpi=plots.DPI)
