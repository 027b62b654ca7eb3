"""`harc train` and `harc run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import Overrides, app, console, out, progress_bars, quiet_transformers
from harc.methods import METHODS, Trainer, load_config, load_data
from harc.models import load_model
from harc.pipeline import load_run_config, run_pipeline


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    overrides: Overrides = None,
    method: Annotated[str | None, typer.Option(help=f"training method ({', '.join(METHODS.names())}); default: the config's `method`, else harc")] = None,
):
    """Train an adapter (resumes from the last checkpoint in its output folder)."""
    cfg = load_config(config, overrides or [], method=method)
    data = load_data(cfg)  # data problems surface before the (slow) model load
    quiet_transformers()
    console.print(f"loading {cfg.model} ...")
    model, tok = load_model(cfg.model, dtype=cfg.torch_dtype,
                            attn_implementation=cfg.attn_implementation)
    trainer = Trainer(cfg, model, tok, data, progress=True)
    console.print(f"training {cfg.method} for {cfg.steps} steps -> {cfg.output_dir}")
    adapter = trainer.train()
    out.print(f"adapter: {adapter}  log: {trainer.log_path}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config: training keys + eval: + run: sections")] = Path("configs/smollm2_135m.yaml"),
    overrides: Overrides = None,
):
    """The whole loop: extract, diagnose, evaluate the base, train, evaluate HARC, report."""
    rc = load_run_config(config, overrides or [])
    quiet_transformers()
    with progress_bars() as progress:
        paths = run_pipeline(rc, log=lambda m: console.print(f"[bold cyan]harc[/]: {m}"),
                             progress=progress)
    out.print(f"report: {paths['html']}")
