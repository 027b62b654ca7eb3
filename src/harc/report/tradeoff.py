"""The trade-off plane of `harc compare`: attack success against false refusals, one point per
policy with 95% intervals on both axes and the Pareto front marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from harc.errors import HarcError
from harc.report.plots import GREY, PALETTE, _finish, _new_figure, _styled

# Marker and colour per kind of policy: the base, a trained method, a layer on the base, a layer
# on a trained method.
KINDS = {"base": ("*", PALETTE[6]), "method": ("o", PALETTE[0]), "layer": ("s", PALETTE[1]),
         "stacked": ("^", PALETTE[2])}
LABELS = {"base": "base model", "method": "trained method", "layer": "policy layer on the base",
          "stacked": "policy layer on a trained method"}


@_styled
def plot_tradeoff_plane(points: Sequence[Mapping], *, title: str | None = None,
                        save: str | Path | None = None) -> Figure:
    """`points`: {"name", "kind", "x", "x_ci", "y", "y_ci", "pareto"} as `harc.report.compare.
    tradeoff` makes them; x = false-refusal rate, y = mean attack success rate."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not pts:
        raise HarcError("no policy has both attack success and false-refusal results")
    fig = _new_figure(7.6, 5.4)
    ax = fig.add_subplot()
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: p["x"])
    if len(front) > 1:
        ax.step([p["x"] for p in front], [p["y"] for p in front], where="post", color=GREY,
                linestyle="--", linewidth=1.2, zorder=2)
    for p in pts:
        marker, color = KINDS.get(p.get("kind"), KINDS["method"])
        (xlo, xhi), (ylo, yhi) = p["x_ci"], p["y_ci"]
        ax.errorbar([p["x"]], [p["y"]], xerr=[[p["x"] - xlo], [xhi - p["x"]]],
                    yerr=[[p["y"] - ylo], [yhi - p["y"]]], fmt="none", ecolor=color, alpha=0.45,
                    elinewidth=1, capsize=2, zorder=3)
        ax.scatter([p["x"]], [p["y"]], marker=marker, s=150 if marker == "*" else 55,
                   color=color, edgecolor="black" if p.get("pareto") else "white",
                   linewidth=1.3 if p.get("pareto") else 0.8,
                   zorder=5 if marker == "*" else 4)  # the base stays visible under a twin
    xmax = max(p["x_ci"][1] for p in pts)
    ymax = max(p["y_ci"][1] for p in pts)
    ax.set_xlim(0, min(1.0, xmax * 1.15 + 0.03))
    ax.set_ylim(0, min(1.05, ymax * 1.1 + 0.03))
    _labels(ax, pts)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(mpl.ticker.PercentFormatter(1.0))
    ax.set_xlabel("false-refusal rate (over-refusal prompts pooled; Wilson 95%)")
    ax.set_ylabel("mean attack success rate (request bootstrap 95%)")
    ax.set_title(title or "Trade-off: robustness against false refusals")
    ax.text(0.99, 0.98, "lower-left is better", transform=ax.transAxes, ha="right", va="top",
            fontsize=8.5, color=GREY, style="italic")
    used = {p.get("kind") for p in pts}
    handles = [Line2D([], [], marker=KINDS[k][0], color=KINDS[k][1], linestyle="none",
                      markersize=8, label=LABELS[k]) for k in KINDS if k in used]
    handles.append(Line2D([], [], color=GREY, linestyle="--", label="Pareto front "
                          "(black edge: on it)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, save)


# Label offsets in points (dx: 1 right of the point, -1 left of it), nearest first; a label
# beyond the first ring gets a leader line to its point.
_RING = ((1, 4), (1, -11), (-1, 4), (-1, -11))
_OFFSETS = _RING + tuple(sorted(((side, dy) for side in (1, -1) for dy in range(-60, 61, 12)
                                 if (side, dy) not in _RING), key=lambda o: abs(o[1])))


def _labels(ax, pts: Sequence[Mapping]) -> None:
    """Name each point at the nearest spot clear of the labels already placed and of the points
    (Pareto-front points first, so theirs stay closest)."""
    scale = ax.figure.dpi / 72  # points to pixels
    height, pad = 9 * scale, 6 * scale  # text height; another point's marker and a margin
    dots = [tuple(ax.transData.transform((p["x"], p["y"]))) for p in pts]
    placed: list[tuple[float, float, float, float]] = []  # left, right, bottom, top in pixels

    def clear(box, own) -> bool:
        left, right, bottom, top = box
        return (all(right < ql or left > qr or top < qb or bottom > qt
                    for ql, qr, qb, qt in placed)
                and not any(left - pad < x < right + pad and bottom - pad < y < top + pad
                            for x, y in dots if (x, y) != own))

    for p in sorted(pts, key=lambda p: (not p.get("pareto"), p["x"], p["y"])):
        px, py = ax.transData.transform((p["x"], p["y"]))
        width = 4.6 * len(str(p["name"])) * scale  # 7.5 pt text, about 4.6 pt per character
        boxes = []
        for side, dy in _OFFSETS:
            left = px + 5 * scale if side > 0 else px - 5 * scale - width
            boxes.append((left, left + width, py + dy * scale, py + dy * scale + height))
        i = next((k for k, box in enumerate(boxes) if clear(box, (px, py))), 0)
        placed.append(boxes[i])
        side, dy = _OFFSETS[i]
        ax.annotate(p["name"], (p["x"], p["y"]), xytext=(5 * side, dy), textcoords="offset points",
                    ha="left" if side > 0 else "right", fontsize=7.5,
                    fontweight="bold" if p.get("pareto") else "normal", zorder=6,
                    arrowprops=None if i < len(_RING) else
                    {"arrowstyle": "-", "color": "0.25", "lw": 0.6, "shrinkA": 0, "shrinkB": 2})
