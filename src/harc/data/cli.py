"""`harc data`: list, inspect and fetch datasets (mounted by harc.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harc.data import registry
from harc.data.loaders import fetch as fetch_sets
from harc.data.loaders import load
from harc.data.profile import default_sets
from harc.errors import HarcError

app = typer.Typer(help="List, inspect and fetch datasets.", no_args_is_help=True)
console = Console()


@app.command("list")
def list_(kind: Annotated[str | None, typer.Option("--kind", "-k", help="only this kind")] = None
          ) -> None:
    """Registered datasets: kind, source, license."""
    if kind is not None and kind not in registry.KINDS:
        raise HarcError(f"unknown kind {kind!r}; one of {sorted(registry.KINDS)}")
    defaults = set(default_sets().names())
    table = Table("name", "kind", "source", "license", "description", show_lines=False)
    for e in registry.entries(kind):
        name = f"[bold]{e.name}[/bold] *" if e.name in defaults else e.name
        table.add_row(name, e.kind, e.source.describe(), e.license, e.description)
    console.print(table)
    console.print("* in the default profile; `harc data fetch` gets them")


@app.command()
def show(name: Annotated[str, typer.Argument(help="dataset name or data file")],
         rows: Annotated[int, typer.Option("--rows", "-n", min=0, help="records to print")] = 5
         ) -> None:
    """Metadata and the first records of a dataset (or of a data file)."""
    if registry.is_registered(name):
        e = registry.get(name)
        meta = {"name": e.name, "kind": e.kind, "source": e.source.describe(),
                "license": e.license, "fields": e.field_map, "description": e.description}
        if e.homepage:
            meta["homepage"] = e.homepage
        for k, v in meta.items():
            console.print(f"[bold]{k}[/bold]: {v}", highlight=False)
    else:
        console.print(f"[bold]file[/bold]: {Path(name)}", highlight=False)
    records = load(name)
    console.print(f"[bold]records[/bold]: {len(records)}")
    for r in records[:rows]:
        console.print(json.dumps(r, ensure_ascii=False)[:600], highlight=False, markup=False)


@app.command()
def fetch(names: Annotated[list[str] | None, typer.Argument(
        help="datasets (default: the default profile)")] = None) -> None:
    """Download and verify datasets into the harc cache; later runs read the cache only."""
    names = names or default_sets().names()
    table = Table("name", "kind", "records", "files")
    failed = []
    for name in names:
        try:
            (rep,) = fetch_sets([name])
        except HarcError as err:
            failed.append(f"{name} ({err})")
            table.add_row(name, "", "[red]failed[/red]", str(err))
            continue
        table.add_row(rep.name, rep.kind, str(rep.records), "\n".join(map(str, rep.files)))
    console.print(table)
    if failed:
        raise HarcError(f"{len(failed)} of {len(names)} datasets failed: " + "; ".join(failed))
