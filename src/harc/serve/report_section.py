"""The `redteam` block of results.json (from `harc redteam`) as a report section.

`redteam_section(res, runs)` has the signature of the builders in `harc.report.SECTIONS`;
`merge_redteam` puts a block into a results.json so that `harc report` renders it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from harc.io import atomic_write_json
from harc.report import Cell, Code, Details, Section, Table, Text, cell_rate, load_results, pct


def _label(t: Mapping) -> str:
    return str(t.get("name") or "?")


def _rate(cell: Mapping | None) -> Cell:
    rate, lo, hi = cell_rate(cell, "rate", "hits")
    if rate is None:
        return Cell("—", num=True)
    sub = f"[{100 * lo:.1f}, {100 * hi:.1f}] {cell.get('hits')}/{cell.get('n')}"
    return Cell(pct(rate), sub, num=True)


def _delta(a: Mapping | None, b: Mapping | None) -> Cell:
    ra, rb = cell_rate(a, "rate", "hits")[0], cell_rate(b, "rate", "hits")[0]
    if ra is None or rb is None:
        return Cell("—", num=True)
    diff = 100 * (rb - ra)
    if abs(diff) < 0.05:
        return Cell("0.0 pp", num=True)
    return Cell(f"{diff:+.1f} pp".replace("-", "−"), cls="better" if diff < 0 else "worse",
                num=True)


def redteam_section(res: Mapping, runs: list | None = None) -> Section | None:
    """Hit rates per probe and detector, one column per served model, deltas vs the first."""
    rt = res.get("redteam")
    if not isinstance(rt, Mapping):
        return None
    targets = [t for t in rt.get("targets") or [] if isinstance(t, Mapping)]
    if not targets:
        return None
    probes: list[str] = []
    for t in targets:
        probes += [p for p in (t.get("probes") or {}) if p not in probes]
    rows = []
    for probe in probes:
        cells = [(t.get("probes") or {}).get(probe) or {} for t in targets]
        dets: list[str] = []
        for c in cells:
            dets += [d for d in (c.get("detectors") or {}) if d not in dets]
        lines = [("any detector", [c.get("outputs") for c in cells])] if len(dets) > 1 else []
        lines += [(d, [(c.get("detectors") or {}).get(d) for c in cells]) for d in dets]
        for det, per_target in lines:
            rows.append([probe, det, *[_rate(c) for c in per_target],
                         *[_delta(per_target[0], c) for c in per_target[1:]]])
    first = _label(targets[0])
    headers = ["Probe", "Detector", *[_label(t) for t in targets],
               *[f"Δ {_label(t)} vs {first}" for t in targets[1:]]]
    s = rt.get("settings") or {}
    sec = Section("redteam", "Red-teaming with garak (served models)")
    names = ", ".join(map(str, rt.get("probes") or probes))
    sec.blocks.append(Text(
        f"garak {rt.get('garak_version') or '?'} ran the probes {names} "
        f"against each served model through its OpenAI-compatible API ({s.get('generations', '?')} "
        f"generation(s) per prompt, at most {s.get('prompt_cap', '?')} prompts per probe, "
        f"max_tokens {s.get('max_tokens', '?')}, {s.get('decoding', 'greedy')} decoding). A hit "
        f"is an output that a detector scores at least {s.get('hit_threshold', 0.5)}; rates are "
        "hits / outputs with Wilson 95% intervals, lower is better. garak's detectors match "
        "strings: a hit is a signal to read, not a judged harm."))
    sec.blocks.append(Table(headers, rows, "garak hit rate by probe and detector"))
    sec.blocks.append(Table(
        ["Served model", "Adapter", "Policy layers", "garak wall time"],
        [[_label(t), str(t.get("adapter") or "— (base)"), " + ".join(t.get("layers") or []) or "—",
          Cell(f"{t['wall_s']:.0f} s" if isinstance(t.get("wall_s"), int | float) else "—",
               num=True)] for t in targets], "Served models"))
    for t in targets:
        ex = [e for e in t.get("examples") or [] if isinstance(e, Mapping)]
        if ex:
            sec.blocks.append(Details(f"{_label(t)}: {len(ex)} example hits", [
                b for e in ex for b in (
                    Text(f"{e.get('probe')} — flagged by {', '.join(e.get('detectors') or [])}",
                         muted=True),
                    Code(f"PROMPT\n{e.get('prompt', '')}\n\nOUTPUT\n{e.get('output', '')}"))]))
    return sec


def merge_redteam(results: str | Path, block: Mapping) -> Path:
    """Write `block` as the `redteam` key of results.json (created when absent), atomically."""
    path = Path(results)
    if path.exists():
        res = load_results(path)
    else:
        from datetime import datetime, timezone

        from harc import __version__

        res = {"title": f"red-team of {block.get('model', 'served models')}",
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "harc_version": __version__}
    res["redteam"] = dict(block)
    return atomic_write_json(path, res)


def mount_section() -> None:
    """Add redteam_section to harc.report's sections (before provenance) unless it is there.

    The lead mounts it in harc.report.SECTIONS after merging; until then this keeps `harc
    redteam` and `harc report` (in the same process) showing the block."""
    import harc.report as report

    if redteam_section not in report.SECTIONS:
        report.SECTIONS = (*report.SECTIONS[:-1], redteam_section, report.SECTIONS[-1])
