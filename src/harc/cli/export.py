"""`harc merge` and `harc export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import (
    DeviceOpt,
    ModelOpt,
    TrustOpt,
    app,
    out,
    quiet_transformers,
    writable_output,
)
from harc.errors import HarcError


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
    model: ModelOpt = "smollm2-135m-instruct",
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="dtype to merge and save in (float32, bfloat16, float16); default: the base model's")] = None,
    trust_remote_code: TrustOpt = False,
):
    """Merge an adapter into its base model and check merged against adapter logits."""
    from harc.export import merge_adapter
    from harc.lora import read_adapter
    from harc.models import peek_identity

    read_adapter(adapter, peek_identity(model))
    if out_dir.exists() and not out_dir.is_dir():
        raise HarcError(f"--out {out_dir} is a file; give a folder for the merged model")
    writable_output(out_dir.parent, 100)
    quiet_transformers()
    res = merge_adapter(model, adapter, out_dir, device=device, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    out.print(f"merged -> {out_dir} ({res['dtype']}; max |logit diff| vs adapter "
              f"{res['max_logit_diff']:.3g})", soft_wrap=True)


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="adapter folder from `harc train`")],
    directions: Annotated[Path | None, typer.Option(help="directions to ship with it")] = None,
    results: Annotated[Path | None, typer.Option(help="results.json whose table goes into the model card")] = None,
):
    """Complete an adapter folder with its directions and a model card (README.md)."""
    from harc.export import export_adapter
    from harc.lora import read_adapter

    read_adapter(adapter)
    export_adapter(adapter, directions, results)
    out.print(f"model card -> {adapter / 'README.md'}", soft_wrap=True)
