"""Per-term training curves of one or more runs, and when each hinge term saturates.

Reads each run's `log.jsonl` (a training folder, the file itself, or a `results.json` whose
`training.log` holds the step records) and writes a PNG (one panel per loss term, one line per
run, log scale) and a JSON with the window means of every term and, per coupling term, the first
step after which its 50-step running mean stays below `--floor` (null: it never saturates).

    python docs/results/loss_curves.py runs/compare/methods/*/train --out docs/results/curves
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from harc.io import atomic_write_text  # noqa: E402

HINGES = ("couple", "couple_resp", "pseudo_ref")
SKIP = {"step", "lr", "loss", "grad_norm", "tokens", "padded_tokens", "tokens_per_s", "step_s",
        "margin"}


def read_steps(path: str | Path) -> list[dict]:
    """The step records (those with a loss) of a run folder, log.jsonl or results.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "log.jsonl"
    if p.suffix == ".json":
        return [r for r in json.loads(p.read_text())["training"]["log"] if "loss" in r]
    return [r for line in p.read_text().splitlines() if line.strip()
            for r in [json.loads(line)] if "loss" in r]


def terms_of(steps: Sequence[dict]) -> list[str]:
    return [k for k, v in steps[0].items() if k not in SKIP and isinstance(v, (int, float))]


def windows(steps: Sequence[dict], width: int = 100) -> list[dict]:
    """Mean of every term over consecutive windows of `width` steps."""
    out = []
    for i in range(0, len(steps), width):
        chunk = steps[i: i + width]
        row = {"steps": f"{chunk[0]['step']}-{chunk[-1]['step']}"}
        for k in terms_of(steps):
            row[k] = sum(r[k] for r in chunk) / len(chunk)
        out.append(row)
    return out


def saturation_step(steps: Sequence[dict], term: str, floor: float = 1e-3,
                    span: int = 50) -> int | None:
    """First step from which the `span`-step running mean of `term` stays below `floor`."""
    vals = [r[term] for r in steps]
    means = [sum(vals[max(0, i - span + 1): i + 1]) / min(span, i + 1) for i in range(len(vals))]
    for i in range(len(means)):
        if all(m < floor for m in means[i:]):
            return steps[i]["step"]
    return None


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="training folders, log.jsonl or results.json files")
    ap.add_argument("--out", required=True, help="output prefix: <out>.png and <out>.json")
    ap.add_argument("--floor", type=float, default=1e-3)
    ap.add_argument("--window", type=int, default=100)
    a = ap.parse_args(argv)
    runs = {}
    for r in a.runs:
        p = Path(r)
        name = p.parent.name if p.name in ("train", "log.jsonl", "results.json") else p.name
        runs[name if name not in runs else str(p)] = read_steps(p)
    summary = {name: {"windows": windows(s, a.window),
                      "saturation_step": {t: saturation_step(s, t, a.floor)
                                          for t in HINGES if t in terms_of(s)}}
               for name, s in runs.items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = list(dict.fromkeys(t for s in runs.values() for t in terms_of(s)))
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 2.8), squeeze=False)
    # One colour per run in every panel: a run lacking a term must not shift the others' colours.
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for ax, t in zip(axes[0], terms, strict=True):
        for name, s in runs.items():
            pts = [(r["step"], r[t]) for r in s if t in r and r[t] > 0 and math.isfinite(r[t])]
            if pts:
                ax.plot(*zip(*pts), lw=0.8, color=colours[name])
        ax.set_yscale("log")
        ax.set_title(t)
        ax.set_xlabel("step")
    fig.legend([plt.Line2D([], [], color=c, lw=1.5) for c in colours.values()], list(colours),
               loc="lower center", ncol=min(len(colours), 4), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(colours) + 3) // 4), 1, 1))
    fig.savefig(f"{a.out}.png", dpi=130)
    atomic_write_text(f"{a.out}.json", json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
