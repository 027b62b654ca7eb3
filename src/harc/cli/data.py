"""`harc data`: list, inspect and fetch datasets (mounted by harc.cli)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harc.cli.common import DeviceOpt, DtypeOpt, TrustOpt, load_quietly, writable_output
from harc.cli.common import app as main_app
from harc.data import registry
from harc.data.loaders import load
from harc.data.profile import default_sets
from harc.data.profile import fetch as fetch_sets
from harc.errors import HarcError, UsageError

app = typer.Typer(help="Datasets: list, show, fetch, synth.", no_args_is_help=True,
                  rich_markup_mode=None)
main_app.add_typer(app, name="data")
console = Console()


@app.command("list")
def list_(kind: Annotated[str | None, typer.Option("--kind", "-k", help="only this kind")] = None
          ) -> None:
    """Registered datasets: kind, source, license."""
    if kind is not None and kind not in registry.KINDS:
        raise UsageError(f"unknown kind {kind!r}; one of {sorted(registry.KINDS)}")
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
    if name in registry.DATASETS:
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


@app.command()
def synth(
    model: Annotated[str, typer.Option("--model", "-m", help="model the triples come from")] = (
        "smollm2-135m-instruct"),
    harmful: Annotated[str, typer.Option(help="harmful prompts: registry name or file")] = "advbench",
    harmless: Annotated[str, typer.Option(help="benign prompts: registry name or file")] = "harc-benign",
    n: Annotated[int, typer.Option(min=1, help="prompts per side")] = 50,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per generated text")] = 64,
    raw_template: Annotated[str | None, typer.Option(help="'qwen', 'llama' or a string with {}")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per generation batch")] = 16,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/synth"),
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """On-policy (prompt, refusal, completion) triples and benign answers from the model itself."""
    from harc.chat import ChatFormat
    from harc.models import peek_identity
    from harc.synth import synth_triples, write_jsonl

    harm = [r["prompt"] for r in load(harmful, limit=n)]
    safe = [r["prompt"] for r in load(harmless, limit=n)]
    if not harm or not safe:
        raise HarcError(f"{harmful if not harm else harmless} holds no prompts")
    peek_identity(model)
    writable_output(out)
    m, tok = load_quietly(model, device, dtype, trust_remote_code)
    t = time.time()
    with console.status(f"generating with {model}"):
        triples, helpful = synth_triples(m, ChatFormat(tok, raw_template=raw_template), harm, safe,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    write_jsonl(out / "triples.jsonl", triples)
    write_jsonl(out / "helpful.jsonl", helpful)
    sources = {}
    for row in triples:
        key = f"refusal:{row['refusal_source']}"
        sources[key] = sources.get(key, 0) + 1
    console.print(f"{len(triples)} triples and {len(helpful)} benign answers in "
                  f"{time.time() - t:.0f} s -> {out} ({json.dumps(sources)})")
