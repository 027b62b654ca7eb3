"""results.json -> one self-contained `report.html` and a `report.md` with PNG plots beside it.

The report is built once as a document tree (`tree`; sections from `sections`, `run_sections`
and `redteam`) and rendered twice (`html` through an autoescaped jinja2 template, `markdown`),
so both files hold the same numbers. Every builder tolerates absent keys: a section whose data is
missing is left out, and a malformed part of results.json costs only its own section.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from harc.eval.results import load_results
from harc.io import atomic_write, atomic_write_text
from harc.report import redteam, run_sections, sections
from harc.report.html import render_html
from harc.report.markdown import render_markdown
from harc.report.tree import Cards, Section, Text, figures, runs_of

SECTIONS = (sections.summary, sections.attacks, sections.per_category, sections.refusal,
            sections.capability, sections.judges, run_sections.geometry, run_sections.plane,
            run_sections.training, sections.examples, redteam.redteam, run_sections.provenance)

# What a malformed results.json raises inside a builder (a string where a list belongs, ...).
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


def build_document(res: Mapping) -> tuple[Cards | None, list[Section]]:
    runs = runs_of(res)
    out = []
    for build in SECTIONS:
        # The failure is shown in the report, so it is not silently lost.
        try:
            sec = build(res, runs)
        except _MALFORMED as e:
            name = build.__name__
            sec = Section(name, name.replace("_", " ").capitalize(),
                          [Text(f"This section could not be rendered: {type(e).__name__}: {e}")])
        if sec is not None:
            out.append(sec)
    try:
        cards = sections.header_cards(res, runs)
    except _MALFORMED:
        cards = None
    return cards, out


def write_report(results: Mapping | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html (self-contained), report.md and its PNG plots into `out_dir`.

    Returns {"html": path, "md": path, <plot name>: png path, ...}. PNGs are written first so
    report.md never points at a file that is not there; every write is atomic.
    """
    res = load_results(results)
    return write_document(res, *build_document(res), out_dir)


def write_document(res: Mapping, cards: Cards | None, secs: list[Section],
                   out_dir: str | Path) -> dict[str, Path]:
    """A built document as report.html, report.md and its PNG plots (the PNGs first)."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for f in figures(secs):
        paths[f.name] = atomic_write(out / f"{f.name}.png", lambda p, b=f.png: p.write_bytes(b))
    paths["md"] = atomic_write_text(out / "report.md", render_markdown(res, cards, secs))
    paths["html"] = atomic_write_text(out / "report.html", render_html(res, cards, secs))
    return paths


__all__ = ["build_document", "write_document", "write_report"]
