"""Matplotlib figures for diagnostics and the report (PNG files and base64 data URIs).

Figures are built with `matplotlib.figure.Figure` and an Agg canvas, never through `pyplot`: no
global figure registry to leak, no GUI backend picked up from the environment, safe to call from
a CLI, a notebook or a test. Every function returns the Figure; `save=` also writes a PNG
atomically. Colours are the Okabe-Ito palette (distinguishable under the common colour-vision
deficiencies); heat maps use the diverging RdBu map, also colour-blind safe.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch

from harc.errors import HarcError
from harc.eval.results import cell_rate, mean_asr, over_refusal_rate, run_label
from harc.io import atomic_write

# Okabe & Ito (2008): blue, orange, bluish green, vermillion, reddish purple, sky blue, black.
# Their yellow is left out: too little contrast on white for lines and small markers.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
GREY = "#7F7F7F"
DPI = 150

STYLE = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: identical output on every machine
    "font.size": 10,
    "axes.titlesize": 11.5,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "axes.prop_cycle": cycler(color=PALETTE),
    "legend.frameon": False,
    "legend.fontsize": 9,
    "lines.linewidth": 1.8,
    "figure.dpi": 100,
}

NAMES = ("v_harm", "v_ref", "v_harm_resp", "v_ref_resp")


def _styled(fn):
    """Build the figure under STYLE: rc params are read when artists are created."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mpl.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: rendering never needs pyplot
    return fig


def _finish(fig: Figure, save: str | Path | None) -> Figure:
    if save is not None:
        save_figure(fig, save)
    return fig


def _arr(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=float).reshape(-1)  # accepts lists, numpy and torch (CPU) tensors
    if a.size == 0:
        raise HarcError(f"{name} is empty; nothing to plot")
    return a


def save_figure(fig: Figure, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` as PNG atomically (format given explicitly: the temp name ends in .tmp)."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))


def fig_to_png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    buf = io.BytesIO()
    # Software metadata off: identical figures give identical bytes (stable report hashes).
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def fig_to_data_uri(fig: Figure, dpi: int = DPI) -> str:
    return png_data_uri(fig_to_png_bytes(fig, dpi))


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _mark_selected(ax, x: np.ndarray, y: np.ndarray, selected, color, label="selected layers"):
    """One scatter for all selected slots (so tests and legends see a single artist)."""
    sel = [int(s) for s in (selected or []) if 0 <= int(s) < len(x)]
    if sel:
        ax.scatter(x[sel], y[sel], s=70, marker="D", facecolor="white", edgecolor=color,
                   linewidth=1.8, zorder=5, label=label)
    return sel


@_styled
def plot_cos_layers(cos_mean, lo, hi, selected: Sequence[int] | None = None, *,
                    title: str | None = None, save: str | Path | None = None) -> Figure:
    """cos(v_ref, v_harm) per layer slot with its 95% bootstrap band; selected layers marked."""
    y = _arr(cos_mean, "cos_mean")
    lo, hi = _arr(lo, "lo"), _arr(hi, "hi")
    x = np.arange(len(y))
    fig = _new_figure(7.5, 3.6)
    ax = fig.add_subplot()
    ax.axhline(0, color=GREY, lw=0.8, zorder=1)
    ax.fill_between(x, lo, hi, color=PALETTE[0], alpha=0.22, lw=0, label="95% bootstrap interval")
    ax.plot(x, y, color=PALETTE[0], marker="o", ms=3, label="mean cos(v_ref, v_harm)")
    sel = _mark_selected(ax, x, y, selected, PALETTE[3])
    ax.set_xlabel("layer slot (residual entering block l; last slot = final output)")
    ax.set_ylabel("cos(v_ref, v_harm)")
    ax.set_title(title or "Alignment of refusal and harmfulness directions per layer")
    ax.set_xlim(-0.5, len(x) - 0.5)
    ax.legend(loc="best")
    if sel:
        ax.set_xticks(sorted(set(ax.get_xticks().astype(int).tolist()) | set(sel)))
        ax.set_xlim(-0.5, len(x) - 0.5)
    return _finish(fig, save)


@_styled
def plot_layer_scores(scores: Mapping[str, Sequence[float]], selected: Sequence[int] | None = None,
                      band: tuple[int, int] | None = None, *, title: str | None = None,
                      save: str | Path | None = None) -> Figure:
    """Layer-selection scores per slot, each divided by its own maximum so shapes compare.

    `band` = (low, high) inclusive slots eligible for selection, shaded.
    """
    if not scores:
        raise HarcError("no layer scores given; nothing to plot")
    fig = _new_figure(7.5, 3.6)
    ax = fig.add_subplot()
    n = 0
    for i, (name, s) in enumerate(scores.items()):
        a = _arr(s, f"score {name}")
        finite = a[np.isfinite(a)]
        peak = np.abs(finite).max() if finite.size else 0.0
        a = np.where(np.isfinite(a), a / peak if peak > 0 else a, np.nan)
        x = np.arange(len(a))
        n = max(n, len(a))
        ax.plot(x, a, color=PALETTE[i % len(PALETTE)], marker="o", ms=3,
                label=name.replace("_", " "))
    if band is not None:
        ax.axvspan(band[0] - 0.5, band[1] + 0.5, color=GREY, alpha=0.12, lw=0,
                   label=f"selection band {band[0]}-{band[1]}")
    for j, s in enumerate(selected or []):
        ax.axvline(int(s), color=PALETTE[3], ls="--", lw=1.1,
                   label="selected layers" if j == 0 else None)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer slot")
    ax.set_ylabel("score / max score")
    ax.set_title(title or "Layer-selection scores (each normalised to its maximum)")
    ax.legend(loc="best")
    return _finish(fig, save)


@_styled
def plot_cross_cos(mats: Mapping[int, Sequence[Sequence[float]]], names: Sequence[str] = NAMES,
                   *, title: str | None = None, save: str | Path | None = None) -> Figure:
    """One annotated 4x4 cosine heat map per layer, shared diverging colour scale -1..1."""
    if not mats:
        raise HarcError("no cosine matrices given; nothing to plot")
    layers = sorted(mats, key=int)
    k = len(layers)
    fig = _new_figure(min(2.5 * k + 1.2, 14), 3.4)
    axes = fig.subplots(1, k, squeeze=False)[0]
    short = [n.removeprefix("v_").replace("_", "\n") for n in names]
    im = None
    for ax, layer in zip(axes, layers, strict=True):
        m = np.asarray(mats[layer], dtype=float)
        if m.shape != (len(names), len(names)):
            raise HarcError(f"cosine matrix of layer {layer} has shape {m.shape}; "
                            f"expected {len(names)}x{len(names)}")
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ax.grid(False)
        for (r, c), v in np.ndenumerate(m):
            # dark text on light cells, white on saturated ones
            ax.text(c, r, f"{v:+.2f}", ha="center", va="center", fontsize=8.5,
                    color="white" if abs(v) > 0.6 else "black")
        ax.set_xticks(range(len(names)), short, fontsize=8.5)
        ax.set_yticks(range(len(names)), short if ax is axes[0] else [], fontsize=8.5)
        ax.tick_params(length=0)
        ax.set_title(f"layer {layer}", loc="center", fontsize=10, pad=4)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label="cosine")
    fig.suptitle(title or "Cosine between the four directions at the selected layers",
                 fontweight="bold", x=0.02, ha="left")
    return _finish(fig, save)


def is_baseline_set(name: str) -> bool:
    """A harmless / benign / XSTest set: drawn grey and never the end of an arrow."""
    n = name.lower()
    return any(w in n for w in ("harmless", "benign", "xstest", "safe"))


@_styled
def plot_plane(points: Mapping[str, Sequence[Sequence[float]]], layer: int,
               xlabel: str = "h(t_inst) projected on v_harm  (harmfulness →)",
               ylabel: str = "h(t_post) projected on v_ref  (refusal →)", *,
               reference: str | None = "harmful (direct)",
               families: Sequence[str] | None = None,
               limits: tuple[tuple[float, float], tuple[float, float]] | None = None,
               title: str | None = None, save: str | Path | None = None) -> Figure:
    """Harmfulness-refusal plane: one colour per prompt set, centroids, and arrows.

    Arrows run from the `reference` centroid (None: no arrows) to each jailbreak family's
    centroid (`families`; default: every set that is neither the reference nor a
    harmless/benign/XSTest set), so the shift an attack causes in each signal reads directly off
    the plot. Centroids are hollow crosses drawn on top, so a tight cloud stays visible under its
    own marker. `limits` = ((x0, x1), (y0, y1)) fixes the axes, so that planes of several runs
    compare.
    """
    if not points:
        raise HarcError("no prompt sets given for the plane plot")
    fig = _new_figure(5.0, 5.3)
    ax = fig.add_subplot()
    cents: dict[str, np.ndarray] = {}
    colors: dict[str, str] = {}
    ci = 0
    for name, pts in points.items():
        p = np.asarray(pts, dtype=float).reshape(-1, 2)
        if name == reference:
            colors[name] = "#000000"
        elif is_baseline_set(name):
            colors[name] = GREY
        else:
            colors[name] = PALETTE[ci % 6]  # skip black: reserved for the reference set
            ci += 1
        if len(p) == 0:
            continue
        ax.scatter(p[:, 0], p[:, 1], s=14, alpha=0.45, color=colors[name], lw=0,
                   label=f"{name} (n={len(p)})")
        cents[name] = p.mean(0)
    if cents:
        c = np.array(list(cents.values()))
        ax.scatter(c[:, 0], c[:, 1], s=120, marker="X", facecolors="none",
                   edgecolors=[colors[n] for n in cents], linewidths=1.6, zorder=6,
                   label="centroids")
    if families is None:
        families = [n for n in cents if n != reference and not is_baseline_set(n)]
    if reference is not None and reference in cents:
        for fam in families:
            if fam in cents:
                ax.add_patch(FancyArrowPatch(
                    cents[reference], cents[fam], arrowstyle="-|>", mutation_scale=14,
                    color=colors[fam], lw=1.6, shrinkA=6, shrinkB=6, zorder=5))
    if limits is not None:
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"Harmfulness-refusal plane, layer {layer}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8,
              markerscale=1.2, handletextpad=0.3, columnspacing=1.0)
    return _finish(fig, save)


@_styled
def plot_asr_bars(runs: Sequence[Mapping], *, title: str | None = None,
                  save: str | Path | None = None) -> Figure:
    """Attack success rate per attack, one bar per run, Wilson 95% error bars."""
    runs = [r for r in runs if r.get("attacks")]
    if not runs:
        raise HarcError("no run has attack results; nothing to plot")
    attacks: list[str] = []
    for r in runs:
        attacks += [a for a in r["attacks"] if a not in attacks]
    width = 0.8 / len(runs)
    x = np.arange(len(attacks))
    fig = _new_figure(max(6.5, 1.1 * len(attacks) * max(1, len(runs) / 2) + 2), 3.8)
    ax = fig.add_subplot()
    for i, r in enumerate(runs):
        vals, err = [], [[], []]
        for a in attacks:
            cell = r["attacks"].get(a)
            rate, lo, hi = cell_rate(cell) if cell else (np.nan, np.nan, np.nan)
            vals.append(rate if rate is not None else np.nan)
            err[0].append(max(0.0, (rate or 0) - lo) if cell else 0)
            err[1].append(max(0.0, hi - (rate or 0)) if cell else 0)
        pos = x + (i - (len(runs) - 1) / 2) * width
        bars = ax.bar(pos, vals, width * 0.92, yerr=err, capsize=3, label=run_label(r),
                      color=PALETTE[i % len(PALETTE)], error_kw={"elinewidth": 1, "ecolor": "#333"})
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{100 * v:.0f}%" for v in vals],
                     padding=2, fontsize=7.5, color="#333")
    long = len(attacks) > 6 or max(len(a) for a in attacks) > 14
    ax.set_xticks(x, [a.replace("_", " ") for a in attacks], rotation=25 if long else 0,
                  ha="right" if long else "center")
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0))
    ax.set_ylabel("attack success rate (lower is better)")
    ax.set_title(title or "Attack success per attack (95% Wilson intervals)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, save)


@_styled
def plot_tradeoff(runs: Sequence[Mapping], over_refusal_sets: Sequence[str] | None = None, *,
                  title: str | None = None, save: str | Path | None = None) -> Figure:
    """Robustness vs over-refusal: x = mean over-refusal rate, y = mean ASR, one point per run."""
    pts = [(run_label(r), over_refusal_rate(r, over_refusal_sets), mean_asr(r)) for r in runs]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        raise HarcError("no run has both a mean ASR and over-refusal results; nothing to plot")
    fig = _new_figure(6.0, 4.2)
    ax = fig.add_subplot()
    for i, (label, xo, ya) in enumerate(pts):
        ax.scatter([xo], [ya], s=80, color=PALETTE[i % len(PALETTE)], zorder=4,
                   edgecolor="white", linewidth=1)
        ax.annotate(label, (xo, ya), xytext=(7, 5), textcoords="offset points", fontsize=9)
    xmax = max(p[1] for p in pts) * 1.35 + 0.02
    ymax = max(p[2] for p in pts) * 1.25 + 0.02
    ax.set_xlim(0, min(1.0, xmax))
    ax.set_ylim(0, min(1.05, ymax))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(mpl.ticker.PercentFormatter(1.0))
    ax.text(0.98, 0.97, "lower-left is better", transform=ax.transAxes, ha="right", va="top",
            fontsize=8.5, color=GREY, style="italic")
    which = ", ".join(over_refusal_sets) if over_refusal_sets else "mean of over-refusal sets"
    ax.set_xlabel(f"over-refusal rate ({which})")
    ax.set_ylabel("mean attack success rate")
    ax.set_title(title or "Robustness vs over-refusal")
    return _finish(fig, save)


# Loss terms first in a fixed, meaningful order; anything else numeric follows.
_TERM_ORDER = ("loss", "couple", "couple_resp", "kl", "ce")
_NOT_TERMS = {"step", "epoch", "wall_s", "time", "tokens"}


# Schedules (not noisy measurements): drawn as steps, never smoothed.
_SCHEDULES = {"lr", "k", "beta", "blend_beta"}


def _smooth(y: np.ndarray, half: int) -> np.ndarray:
    """Centred moving average, window shrunk at the ends: no lag, unlike an EMA."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


@_styled
def plot_training(log: Sequence[Mapping], *, title: str | None = None,
                  save: str | Path | None = None) -> Figure:
    """Each numeric log term against step, one small panel per term (their scales differ)."""
    rows = [r for r in log if isinstance(r, Mapping)]
    if not rows:
        raise HarcError("the training log is empty; nothing to plot")
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in _NOT_TERMS and k not in keys
                 and isinstance(v, int | float) and not isinstance(v, bool)]
    keys.sort(key=lambda k: (_TERM_ORDER.index(k) if k in _TERM_ORDER else len(_TERM_ORDER), k))
    if not keys:
        raise HarcError("the training log has no numeric terms; nothing to plot")
    ncol = min(3, len(keys))
    nrow = -(-len(keys) // ncol)
    fig = _new_figure(3.4 * ncol, 2.5 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True).ravel()
    for ax in axes[len(keys):]:
        fig.delaxes(ax)
    for i, (ax, k) in enumerate(zip(axes, keys, strict=False)):
        pairs = [(r.get("step", j), r[k]) for j, r in enumerate(rows)
                 if isinstance(r.get(k), int | float)]
        x = np.array([p[0] for p in pairs], dtype=float)
        y = np.array([p[1] for p in pairs], dtype=float)
        color = PALETTE[i % len(PALETTE)]
        if k in _SCHEDULES:
            ax.plot(x, y, color=color, drawstyle="steps-post")
        elif len(y) > 50:  # noisy per-step logs: faint raw trace under a smoothed one
            ax.plot(x, y, color=color, alpha=0.3, lw=1)
            ax.plot(x, _smooth(y, max(2, len(y) // 40)), color=color)
        else:
            ax.plot(x, y, color=color, marker="o" if len(y) < 15 else None, ms=3)
        ax.set_title(k.replace("_", " "), fontsize=10)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        if i >= len(keys) - ncol:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(title or "Training terms per step", fontweight="bold", x=0.02, ha="left")
    return _finish(fig, save)


@_styled
def plot_geometry_before_after(before: Mapping, after: Mapping, *, title: str | None = None,
                               save: str | Path | None = None) -> Figure:
    """cos(v_ref, v_harm) per layer for the base and the trained model, with bootstrap bands."""
    fig = _new_figure(7.5, 3.6)
    ax = fig.add_subplot()
    ax.axhline(0, color=GREY, lw=0.8, zorder=1)
    n = 0
    for i, (label, g) in enumerate((("before (base)", before), ("after (HARC)", after))):
        if not g or not g.get("cos_ref_harm"):
            continue
        y = _arr(g["cos_ref_harm"], f"{label} cos_ref_harm")
        x = np.arange(len(y))
        n = max(n, len(y))
        color = PALETTE[0] if i == 0 else PALETTE[3]
        if g.get("ci_lo") and g.get("ci_hi"):
            ax.fill_between(x, _arr(g["ci_lo"], "ci_lo"), _arr(g["ci_hi"], "ci_hi"),
                            color=color, alpha=0.18, lw=0)
        ax.plot(x, y, color=color, marker="o" if i == 0 else "s", ms=3, label=label,
                ls="-" if i == 0 else "--")
        _mark_selected(ax, x, y, g.get("selected_layers"), color,
                       label=f"selected layers ({label.split()[0]})")
    if n == 0:
        raise HarcError("neither geometry has cos_ref_harm; nothing to plot")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer slot")
    ax.set_ylabel("cos(v_ref, v_harm)")
    ax.set_title(title or "Refusal-harmfulness alignment before and after training")
    ax.legend(loc="best")
    return _finish(fig, save)
