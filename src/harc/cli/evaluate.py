"""`harc eval` and `harc report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harc.cli.common import (
    ModelOpt,
    Overrides,
    app,
    chat_format,
    load_quietly,
    out,
    progress_bars,
)
from harc.config import apply_overrides, build, read_yaml, to_dict
from harc.data import load
from harc.directions import Directions
from harc.errors import HarcError
from harc.eval import EvalConfig, Evaluator, GenerationCache, load_eval_data
from harc.eval.filters import FILTERS, PolicyContext, get_filter
from harc.eval.results import over_refusal_rate
from harc.io import atomic_write_json
from harc.layers import plane_layer, select_layers
from harc.lora import load_adapter
from harc.models import environment
from harc.report import write_report


@app.command("eval")
def eval_(
    model: ModelOpt = "smollm2-135m-instruct",
    adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder to compare with the base (repeatable)")] = None,
    input_filter: Annotated[list[str] | None, typer.Option("--filter", help=f"policy layer ({', '.join(FILTERS.names())}; repeatable)")] = None,
    directions: Annotated[Path | None, typer.Option(help="directions for ablation, plane and latent filter")] = None,
    k: Annotated[int, typer.Option(help="layers selected from the directions; the plane and the latent filter read the middle one")] = 4,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with EvalConfig keys (or an eval: section)")] = None,
    out_dir: Annotated[Path, typer.Option("--out")] = Path("runs/eval"),
    overrides: Overrides = None,
    raw_template: Annotated[str | None, typer.Option()] = None,
    system_prompt: Annotated[str | None, typer.Option()] = None,
    device: str | None = None,
    dtype: str | None = None,
):
    """Evaluate the model, each adapter and each filter: attack success, over-refusal, capability."""
    raw = read_yaml(config)[0] if config else {}
    raw = raw.get("eval", raw)
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in overrides or []])
    cfg = build(EvalConfig, raw)
    layers = [get_filter(f) for f in input_filter or []]
    need = [f.name for f in layers if f.needs_directions]
    if need and directions is None:
        raise HarcError(f"policy layer {', '.join(need)} needs --directions (from `harc extract`)")
    data = load_eval_data(cfg)
    m, tok = load_quietly(model, device, dtype)
    chat = chat_format(tok, raw_template, system_prompt, cfg.max_prompt_tokens)
    dirs = Directions.load(directions, m) if directions else None
    layer = plane_layer(select_layers(dirs, k)) if dirs is not None else None

    def bind(name: str, model_):
        # `harc extract` leaves its held-out prompts and synthetic pairs beside the directions.
        val, pairs = {}, {"triples": [], "helpful": []}
        if dirs is not None and (directions.parent / "heldout.json").is_file():
            val = json.loads((directions.parent / "heldout.json").read_text())
        for key in pairs:
            if dirs is not None and (directions.parent / f"{key}.jsonl").is_file():
                pairs[key] = load(str(directions.parent / f"{key}.jsonl"))
        return get_filter(name).bind(PolicyContext(
            model_, chat, dirs, layer, val.get("harmful", []), val.get("harmless", []),
            harmful_openings=[(t["prompt"], t["completion"]) for t in pairs["triples"]],
            benign_answers=[(t["prompt"], t["response"]) for t in pairs["helpful"]]))

    runs = []
    with progress_bars() as progress:
        def evaluate(label, model_, adapter_, f):
            runs.append(Evaluator(model_, chat, cfg, name=label, adapter=adapter_, dirs=dirs,
                                  plane_layer=layer, input_filter=bind(f, model_) if f else None,
                                  cache=GenerationCache(out_dir / f"{label.replace(':', '_')}.generations.jsonl"),
                                  progress=progress).run(data))

        for f in [None, *(input_filter or [])]:
            evaluate("base" if f is None else f"base+{f}", m, None, f)
        for path in adapter or []:
            peft_model = load_adapter(m, path)
            name = f"adapter:{path.name}" if len(adapter) > 1 else "harc"
            for f in [None, *(input_filter or [])]:
                evaluate(name if f is None else f"{name}+{f}", peft_model, str(path), f)
            m = peft_model.unload()
    results = {"title": f"evaluation of {model}", "config": {"eval": to_dict(cfg)},
               "environment": environment(), "judges": {"primary": cfg.judge}, "runs": runs}
    atomic_write_json(out_dir / "results.json", results)
    _print_runs(runs)
    out.print(f"results -> {out_dir / 'results.json'}; `harc report {out_dir / 'results.json'}` renders it")


def _print_runs(runs: list[dict]) -> None:
    table = Table(title="attack success (lower is better) and false refusals")
    table.add_column("policy")
    table.add_column("mean ASR", justify="right")
    for name in runs[0]["attacks"]:
        table.add_column(name, justify="right")
    table.add_column("over-refusal", justify="right")
    table.add_column("benign refusal", justify="right")
    for r in runs:
        over = over_refusal_rate(r)
        table.add_row(r["name"], f"{r['mean_asr']:.2f}", *(f"{a['asr']:.2f}" for a in r["attacks"].values()),
                      f"{over:.2f}" if over is not None else "-", f"{r['benign_refusal']['rate']:.2f}")
    out.print(table)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json from `harc eval` or `harc run`")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: beside results.json")] = None,
):
    """Render results.json as one self-contained HTML page and a Markdown file."""
    paths = write_report(results, out_dir or results.parent)
    out.print(f"report: {paths['html']} and {paths['md']}")
