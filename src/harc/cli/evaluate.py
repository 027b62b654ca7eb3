"""`harc eval` and `harc report`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from harc.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    Overrides,
    TrustOpt,
    app,
    chat_format,
    clock,
    console,
    load_quietly,
    out,
    progress_bars,
    read_json,
    writable_output,
)
from harc.errors import HarcError, UsageError


@app.command("eval")
def eval_(
    model: ModelOpt = "smollm2-135m-instruct",
    adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder to compare with the base (repeatable)")] = None,
    input_filter: Annotated[list[str] | None, typer.Option("--filter", help="policy layer by name, e.g. keyword or latent (repeatable)")] = None,
    directions: Annotated[Path | None, typer.Option(help="directions.safetensors for ablation, plane and latent filter (e.g. RUN/extract/directions.safetensors)")] = None,
    k: Annotated[int, typer.Option(min=1, help="layers selected from the directions; the plane and the latent filter read the middle one")] = 4,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with EvalConfig keys (or an eval: section)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/eval"),
    overrides: Overrides = None,
    raw_template: Annotated[str | None, typer.Option(help="'qwen', 'llama' or a string with {}")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="system prompt of every chat")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
):
    """Evaluate the model, each adapter and each filter: attack success, over-refusal, capability."""
    from harc.config import apply_overrides, build, read_yaml, to_dict
    from harc.directions import read_meta
    from harc.eval import EvalConfig, load_eval_data
    from harc.eval.filters import get_filter
    from harc.lora import read_adapter
    from harc.models import check_identity, peek_identity
    from harc.pipeline.config import check_plugins

    t0 = time.monotonic()
    # Everything that can be checked is checked here, before the model loads.
    raw = read_yaml(config)[0] if config else {}
    raw = raw.get("eval", raw)
    if not isinstance(raw, dict):
        raise HarcError(f"{config}: the eval: section must be a mapping of EvalConfig keys")
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in overrides or []])
    cfg = build(EvalConfig, raw)
    check_plugins(cfg)
    layers = [get_filter(f) for f in input_filter or []]
    heldout = None
    if directions is not None:
        check_identity(read_meta(directions), peek_identity(model), "the directions",
                       f"re-run `harc extract` on {model}")
        heldout = directions.parent / "heldout.json"
    need = [f.name for f in layers if f.needs_directions]
    if need:
        if directions is None:
            raise UsageError(f"policy layer {', '.join(need)} needs --directions (e.g. "
                             "runs/smollm2_135m/extract/directions.safetensors)")
        if not heldout.is_file():
            raise HarcError(f"policy layer {', '.join(need)} calibrates on {heldout}, which is "
                            "missing; re-run `harc extract` or `harc run`, which write it beside "
                            "the directions")
    if len({p.name for p in adapter or []}) < len(adapter or []):
        raise UsageError("two --adapter folders share a name; their results would collide")
    base_ident = peek_identity(model)
    for path in adapter or []:
        read_adapter(path, base_ident)
    data = load_eval_data(cfg)
    writable_output(out_dir)

    from harc.data import load
    from harc.directions import Directions
    from harc.eval import Evaluator, GenerationCache
    from harc.eval.filters import PolicyContext
    from harc.io import atomic_write_json
    from harc.layers import plane_layer, select_layers
    from harc.lora import load_adapter
    from harc.models import environment

    m, tok = load_quietly(model, device, dtype, trust_remote_code)
    chat = chat_format(tok, raw_template, system_prompt, cfg.max_prompt_tokens)
    dirs = Directions.load(directions, m) if directions else None
    layer = None
    if dirs is not None:
        try:
            layer = plane_layer(select_layers(dirs, k))
        except ValueError as e:  # fewer layers in the band than k
            raise HarcError(f"{e} (this model has {dirs.n_slots - 1} layers)") from None
    val = read_json(heldout, "held-out file") if heldout is not None and heldout.is_file() else {}
    # `harc extract` leaves its synthetic pairs beside the directions.
    pairs = {"triples": [], "helpful": []}
    for key in pairs:
        if dirs is not None and (directions.parent / f"{key}.jsonl").is_file():
            pairs[key] = load(str(directions.parent / f"{key}.jsonl"))

    def bind(name: str, model_):
        return get_filter(name).bind(PolicyContext(
            model_, chat, dirs, layer, val.get("harmful", []), val.get("harmless", []),
            harmful_openings=[(t["prompt"], t["completion"]) for t in pairs["triples"]],
            benign_answers=[(t["prompt"], t["response"]) for t in pairs["helpful"]]))

    runs = []
    with progress_bars() as progress:
        def evaluate(label, model_, adapter_, f):
            console.print(f"[bold cyan]harc[/]: evaluating {label}", highlight=False)
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
    path = atomic_write_json(out_dir / "results.json", results)
    _print_summary(results, {"results": path, "adapter": ", ".join(map(str, adapter or [])),
                             "directions": directions}, time.monotonic() - t0)
    out.print(f"`harc report {path}` renders it as HTML", highlight=False, soft_wrap=True)


def _check_results(data, path: Path) -> None:
    """A results file with nothing to report is an error, not a nearly empty page."""
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise HarcError(f"{path} holds no runs to report; give the results.json of `harc eval` "
                        "or `harc run`")
    for i, r in enumerate(runs):
        if not (isinstance(r, dict) and isinstance(r.get("name"), str)
                and isinstance(r.get("attacks"), dict) and r["attacks"]
                and all(isinstance(a, dict) for a in r["attacks"].values())):
            raise HarcError(f"{path}: run {i + 1} is malformed (it needs a name and its attacks' "
                            "results); re-run the evaluation that wrote it")


def _print_summary(results: dict, where: dict, seconds: float) -> None:
    from harc.cli.summary import summary_lines

    out.print(f"harc eval finished in {clock(seconds)}: {results['title']}", highlight=False,
              soft_wrap=True)
    for line in summary_lines(results, where):
        out.print(line, highlight=False, soft_wrap=True)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json from `harc eval` or `harc run`")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: beside results.json")] = None,
):
    """Render results.json as one self-contained HTML page and a Markdown file."""
    from harc.report import write_report

    if not results.is_file():
        raise HarcError(f"results file not found: {results}; `harc eval` or `harc run` writes it")
    _check_results(read_json(results, "results file"), results)
    target = out_dir or results.parent
    writable_output(target, 20)
    paths = write_report(results, target)
    out.print(f"report: {paths['html']} and {paths['md']}", soft_wrap=True)
