"""The `harc compare` report: the trade-off plane (attack success against false refusals, 95%
intervals on both axes, the Pareto front), capability and KL beside it, attack success per attack
and per harm category, and the cost of each policy (training time, added latency per request).

Intervals: the y axis is the mean attack success over the mean-ASR attacks, whose probes share
their harmful requests, so its interval resamples requests (a cluster bootstrap, the same
resamples for every policy); the x axis pools every over-refusal prompt (independent prompts), so
its interval is Wilson's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from harc.eval.results import cell_rate, load_results, mean_asr
from harc.report import write_document
from harc.report.run_sections import provenance
from harc.report.sections import judges
from harc.report.tree import (
    Cards,
    Cell,
    Section,
    Table,
    Text,
    dur,
    figure,
    fnum,
    pct,
    rate_cell,
)
from harc.stats import wilson


def _kind(run: Mapping) -> str:
    c = run.get("compare") or {}
    if c.get("layer") is None:
        return "base" if c.get("entry") == "base" else "method"
    return "layer" if c.get("entry") == "base" else "stacked"


def false_refusal(run: Mapping) -> tuple[float | None, list[float], int, int]:
    """(rate, Wilson interval, refused, n) over every over-refusal prompt of the run, pooled."""
    cells = [c for c in (run.get("over_refusal") or {}).values() if isinstance(c, Mapping)]
    k = sum(int(c.get("refused", 0)) for c in cells)
    n = sum(int(c.get("n", 0)) for c in cells)
    return (k / n if n else None), wilson(k, n), k, n


def asr_interval(run: Mapping, resamples: np.ndarray) -> list[float] | None:
    """95% interval of the mean ASR by resampling harmful requests (`resamples`: [B, R] counts);
    None when the run does not record per-probe outcomes."""
    att = run.get("attacks") or {}
    names = run.get("mean_asr_attacks") or list(att)
    R = resamples.shape[1]
    rates = []
    for a in names:
        cell = att.get(a) or {}
        out, req = cell.get("outcomes"), cell.get("request_index")
        if not out or not req or len(out) != len(req):
            return None
        req, out = np.asarray(req), np.asarray(out, dtype=float)
        keep = (req >= 0) & (req < R)
        success = np.bincount(req[keep], weights=out[keep], minlength=R)
        count = np.bincount(req[keep], minlength=R).astype(float)
        rates.append((resamples @ success) / np.maximum(resamples @ count, 1.0))
    if not rates:
        return None
    lo, hi = np.percentile(np.mean(rates, axis=0), [2.5, 97.5])
    return [float(lo), float(hi)]


def tradeoff(runs: Sequence[Mapping], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One point per policy: mean ASR and false-refusal rate with intervals, capability, KL,
    and whether it is on the Pareto front (no other policy is at least as good on both axes and
    better on one)."""
    n_req = 1 + max((i for r in runs for c in (r.get("attacks") or {}).values()
                     if isinstance(c, Mapping) for i in c.get("request_index") or []), default=0)
    rng = np.random.default_rng(seed)
    resamples = rng.multinomial(n_req, np.full(n_req, 1 / n_req), size=n_boot).astype(float)
    pts = []
    for r in runs:
        y = mean_asr(r)
        x, x_ci, k, n = false_refusal(r)
        y_ci = asr_interval(r, resamples)
        if y_ci is None and y is not None:  # no per-probe outcomes: probes taken as independent
            tot = [c for a, c in (r.get("attacks") or {}).items()
                   if a in (r.get("mean_asr_attacks") or []) and isinstance(c, Mapping)]
            y_ci = wilson(sum(c.get("success", 0) for c in tot), sum(c.get("n", 0) for c in tot))
        cap = r.get("capability") or {}
        pts.append({"name": r.get("name"), "kind": _kind(r),
                    "parent": (r.get("compare") or {}).get("parent"),
                    "y": y, "y_ci": y_ci, "x": x, "x_ci": x_ci, "refused": k, "n_over": n,
                    "benign_refusal": cell_rate(r.get("benign_refusal"), "rate", "refused")[0],
                    "capability": cell_rate(cap.get("items"), "acc", "correct")[0],
                    "kl": cap.get("kl_vs_base")})
    ok = [p for p in pts if p["x"] is not None and p["y"] is not None]
    for p in pts:
        p["pareto"] = p in ok and not any(
            q["x"] <= p["x"] and q["y"] <= p["y"] and (q["x"] < p["x"] or q["y"] < p["y"])
            for q in ok)
    return pts


def _ci(v, ci) -> Cell:
    return Cell(pct(v), f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci and v is not None
                else "", num=True)


def _delta(p: Mapping, by_name: Mapping) -> list[Cell]:
    """ASR and false-refusal changes against the policy it builds on (the base for a method,
    the bare model for a layer)."""
    q = by_name.get(p.get("parent"))
    if q is None or None in (p["x"], p["y"], q["x"], q["y"]):
        return [Cell("—", num=True)] * 2
    return [Cell(f"{100 * (p['y'] - q['y']):+.1f} pp", num=True),
            Cell(f"{100 * (p['x'] - q['x']):+.1f} pp", num=True)]


def _plane(res: Mapping, pts: list[dict]) -> Section:
    from harc.report.tradeoff import plot_tradeoff_plane

    sec = Section("tradeoff", "Trade-off plane")
    fig = figure("tradeoff_plane", lambda: plot_tradeoff_plane(pts),
                  "Mean attack success against false-refusal rate, one point per policy, with "
                  "95% intervals and the Pareto front",
                  "Lower-left is better. Black-edged points are on the Pareto front.")
    if fig:
        sec.blocks.append(fig)
    by_name = {p["name"]: p for p in pts}
    rows = [[Cell(p["name"], cls="strong" if p["pareto"] else ""), p["kind"],
             _ci(p["y"], p["y_ci"]), _ci(p["x"], p["x_ci"]), *_delta(p, by_name),
             Cell(pct(p["benign_refusal"]), num=True), Cell(pct(p["capability"]), num=True),
             Cell(fnum(p["kl"], 4), num=True), "yes" if p["pareto"] else ""]
            for p in sorted(pts, key=lambda p: (p["y"] is None, p["y"] or 0))]
    sec.blocks.append(Table(["Policy", "Kind", "Mean ASR", "False refusals", "Δ ASR",
                             "Δ false refusals", "Benign refused", "Capability", "KL vs base",
                             "Pareto"], rows, "Policies by mean attack success"))
    sec.blocks.append(Text("Δ: against the policy each builds on (the base model for a trained "
                           "method, the bare model for a policy layer). False refusals pool "
                           "every over-refusal prompt; benign instructions are shown apart.",
                           muted=True))
    return sec


def _per_attack(runs: list[dict]) -> Section | None:
    names: list[str] = []
    for r in runs:
        names += [a for a in (r.get("attacks") or {}) if a not in names]
    if not names:
        return None
    rows = [[r.get("name"), *[rate_cell((r.get("attacks") or {}).get(a)) for a in names],
             Cell(pct(mean_asr(r)), cls="strong", num=True)] for r in runs]
    return Section("attacks", "Attack success per attack",
                   [Table(["Policy", *names, "Mean ASR"], rows)])


def _per_category(runs: list[dict]) -> Section | None:
    cats: list[str] = []
    pooled = []
    for r in runs:
        att = r.get("attacks") or {}
        acc: dict[str, list[int]] = {}
        for a in r.get("mean_asr_attacks") or list(att):
            for c, cell in ((att.get(a) or {}).get("per_category") or {}).items():
                tally = acc.setdefault(c, [0, 0])
                tally[0] += int(cell.get("success", 0))
                tally[1] += int(cell.get("n", 0))
                if c not in cats:
                    cats.append(c)
        pooled.append(acc)
    if not [c for c in cats if c != "uncategorised"]:
        return None
    rows = [[r.get("name"), *[rate_cell({"n": acc[c][1], "success": acc[c][0]})
                              if c in acc else Cell("—", num=True) for c in cats]]
            for r, acc in zip(runs, pooled)]
    return Section("categories", "Attack success per harm category",
                   [Table(["Policy", *cats], rows, "Pooled over the mean-ASR attacks")])


def _cost(res: Mapping) -> Section | None:
    cmp = res.get("compare") or {}
    sec = Section("cost", "Cost")
    rows = []
    for name, e in (cmp.get("entries") or {}).items():
        t = e.get("training") or {}
        rows.append([name, str(e.get("method")), str(e.get("init") or "—"),
                     Cell(str(t.get("steps", "—")), num=True), Cell(dur(t.get("wall_s")), num=True),
                     Cell(fnum(t.get("step_s"), 3), num=True)])
    if rows:
        sec.blocks.append(Table(["Entry", "Method", "Starts from", "Steps", "Training time",
                                 "s / step"], rows, "Training (trained methods add no inference "
                                                    "latency once merged)"))
    lat = cmp.get("latency") or {}
    if lat.get("layers"):
        rows = [[name, Cell(f"{1000 * v['s_per_request']:.1f}", num=True),
                 Cell(f"{1000 * v['added_s_per_request']:+.1f}", num=True)]
                for name, v in lat["layers"].items()]
        sec.blocks.append(Table(["Policy layer", "ms / request", "added ms / request"], rows,
                                f"Inference latency on {lat.get('n')} benign requests, base "
                                f"model ({1000 * lat['plain_s_per_request']:.1f} ms / request "
                                "without a layer)"))
    return sec if sec.blocks else None


def _calibration(runs: list[dict]) -> Section | None:
    rows = []
    for r in runs:
        layer = r.get("layer") or {}
        cal = layer.get("calibration") or {}
        if layer:
            text = ", ".join(f"{k} {fnum(v, 3) if isinstance(v, float) else v}"
                             for k, v in cal.items()) or "nothing calibrated"
            rows.append([r.get("name"), str(layer.get("name")), text])
    if not rows:
        return None
    return Section("calibration", "Policy-layer calibration",
                   [Table(["Policy", "Layer", "Calibration (validation data only)"], rows)])


def _sweep(res: Mapping) -> Section | None:
    sw = (res.get("compare") or {}).get("sweep")
    if not sw:
        return None
    rows = [[t["entry"] + (" (chosen)" if t["entry"] == sw["chosen"] else ""),
             Cell(pct(t["asr"]), num=True), Cell(pct(t["false_refusal"]), num=True),
             "yes" if t["eligible"] else "no"] for t in sw["table"]]
    rows.insert(0, ["base", Cell(pct(sw["base"]["asr"]), num=True),
                    Cell(pct(sw["base"]["false_refusal"]), num=True), "—"])
    split = sw.get("split") or {}
    text = (f"Chosen on a validation split only ({split.get('n_harmful')} HarmBench validation "
            f"requests under the evaluation's attacks, {split.get('n_pseudo')} held-out "
            f"pseudo-harmful prompts); the evaluation sets played no part. Rule: {sw['rule']}."
            + ("" if sw.get("constraint_met") else " No entry met the false-refusal constraint."))
    return Section("sweep", "Validation sweep", [Text(text), Table(
        ["Entry", "validation attack success", "validation false refusals",
         "false refusals not above base"], rows)])


def build_compare_document(res: Mapping) -> tuple[Cards | None, list[Section]]:
    runs = [r for r in res.get("runs") or [] if isinstance(r, dict)]
    pts = (res.get("compare") or {}).get("tradeoff") or tradeoff(runs)
    sections = [_plane(res, pts), _per_attack(runs), _per_category(runs), _sweep(res), _cost(res),
                _calibration(runs), judges(res, runs), provenance(res, runs)]
    missing = (res.get("compare") or {}).get("missing")
    if missing:
        sections.insert(1, Section("missing", "Not evaluated yet", [Text(
            f"These policies have no finished evaluation in this folder: {', '.join(missing)}. "
            "Re-run the same `harc compare` command (or with --only) to add them.")]))
    front = [p["name"] for p in pts if p["pareto"]]
    by = {p["name"]: p for p in pts}
    cards = [("Policies", str(len(pts)), f"Pareto front: {', '.join(front)}")]
    for name in ("base", "harc"):
        if name in by and by[name]["y"] is not None:
            cards.append((name, f"{pct(by[name]['y'])} ASR", f"{pct(by[name]['x'])} false "
                                                             "refusals"))
    return Cards(cards), [s for s in sections if s is not None]


def write_compare_report(results: Mapping | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """report.html (self-contained), report.md and its PNG plots in `out_dir`."""
    res = load_results(results)
    return write_document(res, *build_compare_document(res), out_dir)
