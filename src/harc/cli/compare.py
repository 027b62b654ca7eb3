"""`harc compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import Overrides, app, console, out, progress_bars, quiet_transformers


@app.command()
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="a run config with a compare: section")],
    overrides: Overrides = None,
    only: Annotated[str | None, typer.Option(help="comma-separated entries to train and evaluate now (default: all); the report covers every finished one")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="train and evaluate nothing: the report over what is finished")] = False,
    jobs: Annotated[int, typer.Option(min=1, help="entries run at once, each in its own process on the same device, once the base model is evaluated (a small model leaves a GPU launch-bound); logs in OUTPUT_DIR/logs")] = 1,
):
    """Baselines, controls and policy layers against HARC: one trade-off report (resumable)."""
    import sys

    from harc.pipeline.compare import load_compare_config, run_compare

    cc = load_compare_config(config, overrides or [])
    quiet_transformers()
    command = [sys.executable, "-m", "harc", "compare", "--config", str(config),
               *(overrides or [])]
    with progress_bars() as progress:
        paths = run_compare(cc, [] if report_only else
                            [s.strip() for s in only.split(",") if s.strip()] if only else None,
                            log=lambda m: console.print(f"[bold cyan]harc[/]: {m}"),
                            progress=progress, jobs=jobs, command=command)
    out.print(f"report: {paths['html']}")
