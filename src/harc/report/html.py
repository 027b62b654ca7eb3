"""The HTML renderer: the document tree through `templates/report.html.j2`, autoescaped.

The template runs in jinja2's sandbox with autoescaping on, so any text from results.json
(prompts, generations, names, configs) is escaped wherever it lands; the page's only markup is
the template's own.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from jinja2 import PackageLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from harc.report.tree import Cards, Section, runs_of


@functools.cache
def _template():
    env = SandboxedEnvironment(loader=PackageLoader("harc.report", "templates"), autoescape=True,
                               undefined=StrictUndefined, keep_trailing_newline=True)
    return env.get_template("report.html.j2")


def title(res: Mapping) -> str:
    return str(res.get("title") or "HARC evaluation report")


def meta_line(res: Mapping) -> str:
    models = sorted({str(r["model"]) for r in runs_of(res) if r.get("model")})
    env = res.get("environment") or {}
    primary = (res.get("judges") or {}).get("primary")
    bits = [f"created {res['created']}" if res.get("created") else "",
            f"harc {res['harc_version']}" if res.get("harc_version") else "",
            ", ".join(models), f"primary judge {primary}" if primary else "",
            str(env.get("card") or env.get("device") or "")]
    return " · ".join(b for b in bits if b)


def render_html(res: Mapping, cards: Cards | None, sections: list[Section]) -> str:
    return _template().render(title=title(res), meta=meta_line(res), cards=cards,
                              sections=sections, version=res.get("harc_version") or "")
