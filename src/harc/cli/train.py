"""`harc train` and `harc run`."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import (
    Overrides,
    TrustOpt,
    app,
    clock,
    console,
    out,
    progress_bars,
    quiet_transformers,
    stage_logger,
    writable_output,
)
from harc.errors import UsageError


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    overrides: Overrides = None,
    method: Annotated[str | None, typer.Option(help="training method by name (harc or a plugin's); default: the config's `method`, else harc")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine, one per GPU (gloo processes on a CPU); relaunches through torch.distributed.run")] = 1,
    strategy: Annotated[str, typer.Option(help="with several processes (--nproc, torchrun, accelerate launch): ddp (a replica per GPU) or fsdp (FSDP2, sharded)")] = "ddp",
    trust_remote_code: TrustOpt = False,
):
    """Train an adapter (resumes from the last intact checkpoint in its output folder)."""
    import torch

    from harc.distributed import World
    from harc.methods import Trainer, load_config, load_data
    from harc.methods.parallel import STRATEGIES, launch, preflight
    from harc.models import default_device, default_dtype, load_model

    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r} for --strategy; choose one of "
                         f"{', '.join(STRATEGIES)}")

    cfg = load_config(config, overrides or [], method=method)
    data = load_data(cfg)  # data problems surface before the (slow) model load
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        preflight(cfg, World(rank=0, size=nproc, device=torch.device(default_device())),
                  strategy)
        writable_output(Path(cfg.output_dir), 100)
        args = ["train", "--config", str(config), "--strategy", strategy,
                *(["--method", method] if method else []),
                *(["--trust-remote-code"] if trust_remote_code else []), *(overrides or [])]
        sys.exit(launch(nproc, args))
    world = World.from_env()
    try:
        preflight(cfg, world, strategy)
        if world.is_main:
            writable_output(Path(cfg.output_dir), 100)
        if cfg.directions:
            _check_directions(Path(cfg.directions), cfg.model)
        quiet_transformers()
        if world.is_main:
            console.print(f"loading {cfg.model} ...")
        # FSDP2 shards from the CPU: a model one GPU cannot hold never lands whole on one.
        device = "cpu" if world.size > 1 and strategy == "fsdp" else str(world.device)
        model, tok = load_model(cfg.model, device=device,
                                dtype=cfg.torch_dtype or default_dtype(str(world.device)),
                                attn_implementation=cfg.attn_implementation,
                                trust_remote_code=trust_remote_code)
        trainer = Trainer(cfg, model, tok, data, progress=True, world=world, strategy=strategy)
        if world.is_main:
            console.print(f"training {cfg.method} for {cfg.steps} steps -> {cfg.output_dir}"
                          + (f" ({world.size} processes, {strategy})" if world.size > 1 else ""))
        adapter = trainer.train()
        if world.is_main:
            out.print(f"adapter: {adapter}  log: {trainer.log_path}", soft_wrap=True)
    finally:
        world.close()


def _check_directions(path: Path, model: str) -> None:
    """Directions of another model (shape or weights) fail before that model loads."""
    from harc.directions import read_meta
    from harc.models import check_identity, peek_identity

    check_identity(read_meta(path), peek_identity(model), "the directions",
                   f"re-run `harc extract` on {model}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config: training keys + eval: + run: sections")] = Path("configs/smollm2_135m.yaml"),
    overrides: Overrides = None,
    trust_remote_code: TrustOpt = False,
):
    """The whole loop: extract, diagnose, evaluate the base, train, evaluate HARC, report."""
    from harc.cli.summary import summary_lines
    from harc.eval.results import load_results
    from harc.pipeline import load_run_config, run_pipeline

    t0 = time.monotonic()
    rc = load_run_config(config, overrides or [])
    rc.trust_remote_code = trust_remote_code  # the pipeline checks its folder before loading
    quiet_transformers()
    with progress_bars() as progress:
        paths = run_pipeline(rc, log=stage_logger(), progress=progress)
    results = load_results(rc.out / "results.json")
    where = {"report": paths["html"], "adapter": rc.out / "train" / "adapter",
             "directions": rc.out / "extract" / "directions.safetensors"}
    out.print(f"harc run finished in {clock(time.monotonic() - t0)}: {results.get('title', '')}",
              highlight=False, soft_wrap=True)
    for line in summary_lines(results, where, results.get("skipped_stages") or ()):
        out.print(line, highlight=False, soft_wrap=True)
