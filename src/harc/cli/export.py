"""`harc merge` and `harc export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import ModelOpt, app, out, quiet_transformers
from harc.export import export_adapter, merge_adapter


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
    model: ModelOpt = "smollm2-135m-instruct",
    device: str | None = None,
    dtype: Annotated[str | None, typer.Option(help="dtype to merge and save in (float32, bfloat16, float16); default: the base model's")] = None,
):
    """Merge an adapter into its base model and check merged against adapter logits."""
    quiet_transformers()
    res = merge_adapter(model, adapter, out_dir, device=device, dtype=dtype)
    out.print(f"merged -> {out_dir} ({res['dtype']}; max |logit diff| vs adapter {res['max_logit_diff']:.3g})")


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="adapter folder from `harc train`")],
    directions: Annotated[Path | None, typer.Option(help="directions to ship with it")] = None,
    results: Annotated[Path | None, typer.Option(help="results.json whose table goes into the model card")] = None,
):
    """Complete an adapter folder with its directions and a model card (README.md)."""
    export_adapter(adapter, directions, results)
    out.print(f"model card -> {adapter / 'README.md'}")
