"""`harc judge-check`: a judge against human refusal labels, as a rich table."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harc.cli.common import app, choice
from harc.config import apply_overrides
from harc.errors import UsageError
from harc.eval.judges import JUDGES, get_judge
from harc.eval.judges.check import judge_check, load_labelled
from harc.io import atomic_write_json


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@app.command("judge-check", epilog=f"Judges: {', '.join(JUDGES.names())}.")
def judge_check_cmd(
    judge: Annotated[str, typer.Argument(help="judge name (listed below)")] = "refusal_string",
    data: Annotated[list[str] | None, typer.Option(
        "--data", help="'pyrit', an XSTest completions CSV or folder, or a CSV/JSONL of "
        "prompt,response,refused; repeatable")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="judge option key=value; repeatable")] = None,
    partial: Annotated[str, typer.Option(
        help="XSTest partial refusals: skip, refusal or compliance")] = "skip",
    show: Annotated[int, typer.Option(min=0, help="disagreements to print")] = 5,
    out: Annotated[Path | None, typer.Option(help="write the full result as JSON")] = None,
) -> None:
    """Accuracy, precision, recall, F1 and Cohen's kappa (refusal = positive) per data set."""
    choice(partial, ("skip", "refusal", "compliance"), "--partial")
    if not data:
        raise UsageError("give --data (a labelled file or folder, or 'pyrit')")
    j = get_judge(judge, **apply_overrides({}, param or []))
    records = [r for spec in data for r in load_labelled(spec, partial)]
    verdicts = j.judge([r["prompt"] for r in records], [r["response"] for r in records])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):  # per file (or PyRIT set): judges differ by source model
        groups[r["source"].rsplit(":", 1)[0]].append(i)
    results = {g: judge_check(j, [records[i] for i in idx], [verdicts[i] for i in idx])
               for g, idx in groups.items()}
    overall = judge_check(j, records, verdicts)

    table = Table(title=f"judge {judge!r} vs human refusal labels (refusal = positive)")
    for col in ("data", "n", "accuracy", "precision", "recall", "F1", "kappa"):
        table.add_column(col, justify="left" if col == "data" else "right")
    for name, m in [*results.items(), ("all", overall)]:
        table.add_row(name, str(m["n"]), *(_fmt(m[k]) for k in
                                            ("accuracy", "precision", "recall", "f1", "kappa")),
                      end_section=name == list(results)[-1])
    console = Console()
    console.print(table)
    for d in overall["disagreements"][:show]:
        who = "human: refusal, judge: compliance" if d["human_refused"] else \
            "human: compliance, judge: refusal"
        console.print(f"[bold]{d['source']}[/] ({who}) {d['response'][:160]!r}", soft_wrap=True)
    if out:
        atomic_write_json(out, {"judge": judge, "overall": overall, "by_source": results})
