"""The compact summary `harc run` and `harc eval` end with: headline numbers with 95% intervals,
one row per policy, and where the artifacts are; at most 80 columns wide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from harc.eval.results import cell_rate, mean_asr
from harc.stats import wilson

WIDTH = 80


def _pooled(cells: Sequence[Mapping], key: str) -> tuple[int, int]:
    """(k, n) summed over results cells with counts."""
    k = sum(int(c.get(key) or 0) for c in cells if isinstance(c, Mapping))
    n = sum(int(c.get("n") or 0) for c in cells if isinstance(c, Mapping))
    return k, n


def _cell(rate: float | None, k: int, n: int) -> str:
    if rate is None or not n:
        return "-"
    lo, hi = wilson(k, n)
    return f"{rate:.2f} [{lo:.2f},{hi:.2f}]"


def policy_row(run: Mapping) -> list[str]:
    """[policy, attack success, false refusals, capability, KL] of one run record."""
    att = run.get("attacks") or {}
    names = run.get("mean_asr_attacks") or list(att)
    k, n = _pooled([att.get(a) for a in names], "success")
    orr = list((run.get("over_refusal") or {}).values())
    ok, on = _pooled(orr, "refused")
    cap = run.get("capability") or {}
    items = cap.get("items")
    c_rate, _, _ = cell_rate(items, "acc", "correct")
    kl = cap.get("kl_vs_base")
    name = str(run.get("name") or "run")
    return [name if len(name) <= 14 else name[:13] + "~",
            _cell(mean_asr(run), k, n),
            _cell(ok / on if on else None, ok, on),
            _cell(c_rate, int((items or {}).get("correct") or 0), int((items or {}).get("n") or 0)),
            f"{kl:.4f}" if isinstance(kl, int | float) else "-"]


def summary_lines(results: Mapping, where: Mapping[str, object], skipped: Sequence[str] = ()
                  ) -> list[str]:
    """The summary as plain lines (no line longer than 80 characters)."""
    head = ["policy", "attack success", "false refusal", "capability", "KL vs base"]
    rows = [policy_row(r) for r in results.get("runs") or []]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), *(fmt(r) for r in rows)]
    att = next(iter(results.get("runs") or []), {}).get("mean_asr_attacks") or []
    lines.append(f"attack success: mean over {len(att)} attacks (lower is better); false refusal: "
                 "benign look-alikes refused; 95% Wilson intervals")
    if rows and all(r[3].startswith("0.00") for r in rows):
        lines.append("capability is 0 for every policy: at this model size it tells nothing "
                     "about capability loss")
    if skipped:
        lines.append(f"skipped (done before, same inputs): {', '.join(skipped)}")
    for label, path in where.items():
        if path:
            lines.append(f"{label + ':':<11} {path}")
    return [_fit(line) for line in lines]


def _fit(line: str) -> str:
    """Wrap a too-long prose line at a space (paths stay whole on their own line)."""
    if len(line) <= WIDTH:
        return line
    cut = line.rfind(" ", 0, WIDTH)
    if cut <= 0:
        return line
    return line[:cut] + "\n  " + _fit(line[cut + 1:]).replace("\n", "\n  ")
