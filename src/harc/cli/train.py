"""`harc train` and `harc run`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from harc.cli.common import Overrides, app, console, out, progress_bars, quiet_transformers
from harc.distributed import World
from harc.methods import METHODS, Trainer, load_config, load_data
from harc.methods.parallel import launch, preflight
from harc.models import default_device, default_dtype, load_model
from harc.pipeline import load_run_config, run_pipeline


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    overrides: Overrides = None,
    method: Annotated[str | None, typer.Option(help=f"training method ({', '.join(METHODS.names())}); default: the config's `method`, else harc")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine, one per GPU (gloo processes on a CPU); relaunches through torch.distributed.run")] = 1,
    strategy: Annotated[str, typer.Option(help="with several processes (--nproc, torchrun, accelerate launch): ddp (a replica per GPU) or fsdp (FSDP2, sharded)")] = "ddp",
):
    """Train an adapter (resumes from the last checkpoint in its output folder)."""
    cfg = load_config(config, overrides or [], method=method)
    data = load_data(cfg)  # data problems surface before the (slow) model load
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        preflight(cfg, World(rank=0, size=nproc, device=torch.device(default_device())),
                  strategy)
        args = ["train", "--config", str(config), "--strategy", strategy,
                *(["--method", method] if method else []), *(overrides or [])]
        sys.exit(launch(nproc, args))
    world = World.from_env()
    try:
        preflight(cfg, world, strategy)
        quiet_transformers()
        if world.is_main:
            console.print(f"loading {cfg.model} ...")
        # FSDP2 shards from the CPU: a model one GPU cannot hold never lands whole on one.
        device = "cpu" if world.size > 1 and strategy == "fsdp" else str(world.device)
        model, tok = load_model(cfg.model, device=device,
                                dtype=cfg.torch_dtype or default_dtype(str(world.device)),
                                attn_implementation=cfg.attn_implementation)
        trainer = Trainer(cfg, model, tok, data, progress=True, world=world, strategy=strategy)
        if world.is_main:
            console.print(f"training {cfg.method} for {cfg.steps} steps -> {cfg.output_dir}"
                          + (f" ({world.size} processes, {strategy})" if world.size > 1 else ""))
        adapter = trainer.train()
        if world.is_main:
            out.print(f"adapter: {adapter}  log: {trainer.log_path}")
    finally:
        world.close()


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
