"""Section builders for what a `harc run` adds around the evaluation: geometry before and after
training, the harmfulness-refusal plane, training, and provenance (versions, runs, data sets,
which directions file is which, the exact configuration).

Every sentence states what the numbers in front of the reader show, never an expected effect.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from harc.eval.results import DIRECTIONS_FILES, _num, run_label, training_speed
from harc.io import sha256_json
from harc.report.tree import (
    Cell,
    Code,
    Details,
    Grid,
    Section,
    Table,
    Text,
    delta_cell,
    dur,
    figure,
    fnum,
    slug,
)


def _at(d: Mapping, key: str, s: int) -> float | None:
    v = d.get(key) or []
    return _num(v[s]) if isinstance(v, list) and 0 <= s < len(v) else None


def _ci(d: Mapping, s: int) -> tuple[float, float] | None:
    lo, hi = _at(d, "ci_lo", s), _at(d, "ci_hi", s)
    return None if lo is None or hi is None else (lo, hi)


def _layers(d: Mapping) -> list[int]:
    return [int(s) for s in (d.get("selected_layers") or [])]


def geometry_statement(before: Mapping, after: Mapping) -> str | None:
    """What cos(v_ref, v_harm) did at the layers selected on the base model, in numbers."""
    sel = _layers(before) or _layers(after)
    pairs = [(s, _at(before, "cos_ref_harm", s), _at(after, "cos_ref_harm", s)) for s in sel]
    pairs = [(s, b, a) for s, b, a in pairs if b is not None and a is not None]
    if not pairs:
        return None
    k = len(pairs)
    mb, ma = sum(b for _, b, _ in pairs) / k, sum(a for _, _, a in pairs) / k
    rose = sum(a > b for _, b, a in pairs)
    fell = sum(a < b for _, b, a in pairs)
    verb = "rose" if ma > mb else "fell" if ma < mb else "did not change"
    where = f"layer {pairs[0][0]}" if k == 1 else \
        f"layers {', '.join(str(s) for s, _, _ in pairs)}"
    model = "base" if _layers(before) else "trained"
    each = (f"it rose at all {k}" if rose == k else f"it fell at all {k}" if fell == k
            else f"it rose at {rose} and fell at {fell} of the {k}")
    text = (f"cos(v_ref, v_harm) {verb} at the {where} selected on the {model} model: from "
            f"{'a mean of ' if k > 1 else ''}{mb:.3f} before training to {ma:.3f} after (after: "
            "directions re-extracted with the adapter on)" + (f"; {each} layers." if k > 1 else "."))
    cis = [(_ci(before, s), _ci(after, s)) for s, _, _ in pairs]
    if all(b and a for b, a in cis):
        apart = sum(a[1] < b[0] or a[0] > b[1] for b, a in cis)
        text += (f" At {apart} of the {k} layers the 95% bootstrap intervals do not overlap."
                 if k > 1 else " The 95% bootstrap intervals before and after "
                 + ("do not overlap." if apart else "overlap."))
    return text


def geometry(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    g = res.get("geometry") or {}
    before, after = g.get("before") or {}, g.get("after") or {}
    if not (before or after):
        return None
    sec = Section("geometry", "Geometry before and after")
    both = before.get("cos_ref_harm") and after.get("cos_ref_harm")
    if both:
        statement = geometry_statement(before, after)
        if statement:
            sec.blocks.append(Text(statement))
        fig = figure("geometry", lambda: plots.plot_geometry_before_after(before, after),
                     "Line plot of cos(v_ref, v_harm) per layer before and after training")
    else:
        one = before if before.get("cos_ref_harm") else after
        fig = figure("geometry", lambda: plots.plot_cos_layers(
            one["cos_ref_harm"], one.get("ci_lo") or one["cos_ref_harm"],
            one.get("ci_hi") or one["cos_ref_harm"], one.get("selected_layers")),
            "Line plot of cos(v_ref, v_harm) per layer with bootstrap interval")
    if fig:
        sec.blocks.append(fig)

    sel = sorted(set(_layers(before)) | set(_layers(after)))
    if sel and both:
        rows = []
        for s in sel:
            cb, ca = _at(before, "cos_ref_harm", s), _at(after, "cos_ref_harm", s)
            sub = [f"[{ci[0]:.3f}, {ci[1]:.3f}]" if (ci := _ci(d, s)) else ""
                   for d in (before, after)]
            mark = [w for w, d in (("before", before), ("after", after)) if s in _layers(d)]
            # The difference is shown neutrally: neither direction is a success in itself.
            diff = Cell(delta_cell(cb, ca, False, "", 1.0, 3).text, num=True)
            rows.append([Cell(str(s), num=True), Cell(fnum(cb, 3), sub[0], num=True),
                         Cell(fnum(ca, 3), sub[1], num=True), diff, " and ".join(mark) or "—"])
        sec.blocks.append(Table(["Layer", "cos before [95% CI]", "cos after [95% CI]", "Δ",
                                 "Selected on"], rows,
                                "cos(v_ref, v_harm) at the layers selected before or after "
                                "training"))

    # Layer scores drive the selection, which is made on the base model's directions: show the
    # scores of "before" (or of "after" when that is all there is).
    src, which = (before, "before") if before.get("score_variant_d") or before.get(
        "score_legacy") else (after, "after")
    scores = {k.removeprefix("score_"): src[k] for k in ("score_variant_d", "score_legacy")
              if src.get(k)}
    band = src.get("band") if isinstance(src.get("band"), list) and len(src["band"]) == 2 \
        else None
    f = figure("layer_scores", lambda: plots.plot_layer_scores(
        scores, src.get("selected_layers"), tuple(band) if band else None,
        title=f"Layer-selection scores ({which}), each divided by its maximum"),
        f"Layer-selection scores per layer ({which})")
    if f:
        sec.blocks.append(f)
    for label, d in (("before", before), ("after", after)):
        mats = d.get("cross_cos")
        if isinstance(mats, Mapping) and mats:
            f = figure(f"cross_cos_{label}", lambda m=mats, lab=label: plots.plot_cross_cos(
                {int(k): v for k, v in m.items()},
                title=f"Cosine between the four directions at the selected layers ({lab})"),
                f"Heat maps of cosines between the four directions ({label})")
            if f:
                sec.blocks.append(f)
    return sec if sec.blocks else None


def _plane_limits(runs: list[dict]):
    """Common axes for every run's plane (5% margin), so their clouds compare by eye."""
    xs, ys = [], []
    for r in runs:
        for pts in ((r.get("plane") or {}).get("points") or {}).values():
            for q in pts:
                if isinstance(q, Sequence) and len(q) == 2:
                    xs.append(float(q[0]))
                    ys.append(float(q[1]))
    if not xs:
        return None

    def pad(v):
        lo, hi = min(v), max(v)
        m = 0.05 * (hi - lo or 1.0)
        return lo - m, hi + m

    return pad(xs), pad(ys)


# The directly asked harmful prompts: "harmful (direct)" in diagnose, the `direct` attack in runs.
_REFERENCES = ("harmful (direct)", "direct")


def plane(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    grid, rows, arrows = [], [], False
    limits = _plane_limits(runs)
    for r in runs:
        p = r.get("plane") or {}
        pts = p.get("points") or {}
        if not pts:
            continue
        layer = p.get("layer", "?")
        ref = next((n for n in _REFERENCES if n in pts), None)
        arrows |= ref is not None and any(not plots.is_baseline_set(n) and n != ref for n in pts)
        f = figure(f"plane_{slug(run_label(r))}", lambda pts=pts, layer=layer, r=r, ref=ref:
                   plots.plot_plane(pts, layer, reference=ref, limits=limits,
                                    title=f"{run_label(r)}: harmfulness-refusal plane, "
                                          f"layer {layer}"),
                   f"Scatter of prompts in the harmfulness-refusal plane for {run_label(r)}")
        if f:
            grid.append(f)
        for name, xy in pts.items():
            xy = [q for q in xy if isinstance(q, Sequence) and len(q) == 2]
            if xy:
                cx = sum(q[0] for q in xy) / len(xy)
                cy = sum(q[1] for q in xy) / len(xy)
                rows.append((run_label(r), name, len(xy), cx, cy))
    if not grid and not rows:
        return None
    sec = Section("plane", "Harmfulness-refusal plane per attack family")
    text = ("x: projection of the residual at the last instruction token on v_harm; y: "
            "projection at the last prompt token on v_ref. Hollow crosses mark each prompt "
            "set's centroid. ")
    if arrows:
        text += ("Arrows run from the centroid of the directly asked harmful prompts to each "
                 "jailbreak family's centroid: a jailbreak that lowers y without lowering x "
                 "suppresses refusal while the model still registers harm. ")
    if len(grid) > 1:
        text += "The panels share their axes, so a run's shift reads off by comparing panels."
    sec.blocks.append(Text(text.strip(), muted=True))
    if grid:
        sec.blocks.append(Grid(grid))
    if rows:
        sec.blocks.append(Details("Centroids per prompt set", [Table(
            ["Run", "Prompt set", "n", "harmfulness (x)", "refusal (y)"],
            [[a, b, Cell(str(n), num=True), Cell(fnum(x, 3), num=True),
              Cell(fnum(y, 3), num=True)] for a, b, n, x, y in rows])]))
    return sec


# Log fields that are not training terms: speed and token counts.
_NOT_TERMS = {"step", "tokens", "padded_tokens", "tokens_per_s", "step_s", "wall_s"}


def training(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    t = res.get("training") or {}
    log = t.get("log") if isinstance(t.get("log"), list) else []
    if not (t and (log or t.get("steps"))):
        return None
    sec = Section("training", "Training")
    facts = []
    if t.get("steps") is not None:
        facts.append(f"{t['steps']} steps")
    if _num(t.get("wall_s")) is not None:
        facts.append(f"wall time {dur(t['wall_s'])}")
    refresh = ((res.get("config") or {}).get("train") or {}).get("refresh_every")
    speed = training_speed(log, refresh if isinstance(refresh, int) else None)
    if speed:
        facts.append(f"{speed[0]:,.0f} tokens/s (median of {speed[1]} steps; the first step and "
                     "the steps after a direction refresh or a change of layers are left out)")
    if log and isinstance(log[-1], Mapping):
        last = ", ".join(f"{k} {v:.4g}" for k, v in log[-1].items()
                         if k not in _NOT_TERMS and _num(v) is not None)
        facts.append(f"last logged step {log[-1].get('step', '?')}: {last}")
    if facts:
        sec.blocks.append(Text("; ".join(facts) + "."))
    if log:
        f = figure("training", lambda: plots.plot_training(log),
                   "Small multiples of each training term against step")
        if f:
            sec.blocks.append(f)
    return sec


def _data_rows(data: Mapping) -> list[list]:
    """One row per data set: `harc run` records {"sets": {role: name}, "sizes": {role_split: n},
    ...}; other producers record {name: {"n", "sha256", "source"}}."""
    sets = data.get("sets")
    if not isinstance(sets, Mapping):
        return [[str(name), Cell(str(d.get("n", "—")), num=True),
                 Cell(str(d.get("sha256", "—")), cls="mono"), str(d.get("source", "—"))]
                for name, d in data.items() if isinstance(d, Mapping)
                and {"n", "sha256", "source"} & set(d)]
    sizes = {**(data.get("sizes") or {}),
             **{k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}}
    roles = sorted(sets, key=len, reverse=True)  # "harmful_eval" before "harmful"
    splits: dict[str, dict[str, int]] = {r: {} for r in sets}
    for key, n in sizes.items():
        role = next((r for r in roles if key == r or key.startswith(r + "_")), None)
        if role is not None and _num(n) is not None:
            splits[role][key[len(role) + 1:]] = int(n)
    removed = data.get("removed_near_duplicates") or {}
    rows = []
    for role, name in sets.items():
        parts = splits[role]
        whole = parts.pop("", None)
        total = whole if whole is not None else sum(parts.values()) if parts else None
        drop = ", ".join(f"{k.split(':', 1)[1].replace('_', ' ')} {v}"
                         for k, v in removed.items() if k.split(":", 1)[0] == role and v)
        rows.append([str(name), role, Cell("—" if total is None else str(total), num=True),
                     " · ".join(f"{k} {v}" for k, v in parts.items()) or "—", drop or "none"])
    return rows


def provenance(res: Mapping, runs: list[dict]) -> Section | None:
    sec = Section("provenance", "Configuration, versions and data")
    facts = [("harc version", res.get("harc_version")), ("created", res.get("created")),
             ("results sha256", sha256_json(res))]
    env = res.get("environment") or {}
    rows = [[k, str(v)] for k, v in facts if v] + [[str(k), str(v)] for k, v in env.items()]
    sec.blocks.append(Table(["Item", "Value"], rows, "Versions and environment"))
    model_rows = [[run_label(r), str(r.get("model") or "—"), str(r.get("adapter") or "—"),
                   str(r.get("filter") or "—"), Cell(dur(r.get("wall_s")), num=True)]
                  for r in runs]
    if model_rows:
        sec.blocks.append(Table(["Run", "Model", "Adapter", "Filter", "Wall time"], model_rows,
                                "Runs"))
    data = res.get("data") if isinstance(res.get("data"), Mapping) else {}
    rows = _data_rows(data)
    if rows and isinstance(data.get("sets"), Mapping):
        sec.blocks.append(Table(["Data set", "Role", "n", "Splits", "Near-duplicates removed"],
                                rows, "Data sets (sizes after de-duplication)"))
        overlaps = {k: v for k, v in (data.get("overlaps") or {}).items() if v}
        if data.get("overlaps") is not None:
            sec.blocks.append(Text("Prompts shared between splits: " + (", ".join(
                f"{k} {v}" for k, v in overlaps.items()) if overlaps else "none."), muted=True))
    elif rows:
        sec.blocks.append(Table(["Data set", "n", "sha256", "Source"], rows, "Data sets"))
    if (res.get("geometry") or {}).get("after"):
        sec.blocks.append(Table(["File in the run folder", "What it holds"],
                                [[Cell(p, cls="mono"), what] for p, what in DIRECTIONS_FILES],
                                "The directions files"))
    if res.get("config"):
        sec.blocks.append(Details("Configuration (exact)", [Code(json.dumps(
            res["config"], indent=2, ensure_ascii=False, default=str))]))
    return sec
