"""`harc train` and `harc run`."""

from __future__ import annotations

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


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    overrides: Overrides = None,
    method: Annotated[str | None, typer.Option(help="training method by name (harc or a plugin's); default: the config's `method`, else harc")] = None,
    trust_remote_code: TrustOpt = False,
):
    """Train an adapter (resumes from the last intact checkpoint in its output folder)."""
    from harc.methods import Trainer, load_config, load_data
    from harc.models import load_model

    cfg = load_config(config, overrides or [], method=method)
    data = load_data(cfg)  # data problems surface before the (slow) model load
    writable_output(Path(cfg.output_dir), 100)
    if cfg.directions:
        _check_directions(Path(cfg.directions), cfg.model)
    quiet_transformers()
    console.print(f"loading {cfg.model} ...")
    model, tok = load_model(cfg.model, dtype=cfg.torch_dtype,
                            attn_implementation=cfg.attn_implementation,
                            trust_remote_code=trust_remote_code)
    trainer = Trainer(cfg, model, tok, data, progress=True)
    console.print(f"training {cfg.method} for {cfg.steps} steps -> {cfg.output_dir}")
    adapter = trainer.train()
    out.print(f"adapter: {adapter}  log: {trainer.log_path}", soft_wrap=True)


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
