"""Adapter export: the PEFT folder completed with its directions and a model card; merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from harc.chat import ChatFormat
from harc.directions import Directions
from harc.errors import HarcError
from harc.eval.results import (
    DIRECTIONS_FILES,
    capability_caveat,
    load_results,
    mean_asr,
    over_refusal_rate,
    run_label,
)
from harc.io import atomic_write, atomic_write_text, replace_dir, temp_dir
from harc.lora import base_model_ids, load_adapter, merge_and_check
from harc.models import BUILTIN_MODELS, load_model, resolve_model_path

TAGS = ["harc", "safety", "lora", "jailbreak-robustness"]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _directions_note(dirs_meta: dict | None) -> str:
    if dirs_meta is None:
        return "none shipped"
    if "blend_beta" in dirs_meta:
        return ("the trainer's blended directions (base directions blended with re-extractions, "
                f"beta {dirs_meta['blend_beta']})")
    return f"the base directions, extracted from {dirs_meta.get('model', 'the base model')}"


def model_card(meta: dict, results: dict | None = None, dirs_meta: dict | None = None):
    """The model card (a `huggingface_hub.ModelCard`) from harc_adapter.json, the metadata of the
    shipped directions and results.json when an evaluation exists."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = str(meta.get("model") or "")
    _, hub_id = base_model_ids(spec)
    builtin = BUILTIN_MODELS.get(spec)
    data = ModelCardData(base_model=hub_id, library_name="peft", tags=TAGS,
                         license=builtin.license.lower() if builtin else None)
    cfg = meta.get("config", {})
    w, lora, sets = cfg.get("weights", {}), cfg.get("lora", {}), cfg.get("data", {})
    base = hub_id or spec
    if builtin:
        base += f" (harc built-in `{spec}`)"
    elif hub_id and hub_id != spec:
        base += f" (loaded from {spec})"
    lines = [
        f"# HARC adapter for {hub_id or spec}",
        "",
        "A LoRA adapter trained with HARC (Harmfulness-And-Refusal Coupling, arXiv 2607.00572) by "
        f"harc {meta.get('harc_version')}: it couples the model's harmfulness and refusal "
        "directions at the prompt and response sides, with a KL term that keeps benign behaviour "
        "and a CE term that teaches refusals.",
        "",
        "| | |", "|---|---|",
        f"| base model | {base}, revision {meta.get('revision') or 'n/a'} |",
        f"| architecture | {meta.get('architecture')}, {meta.get('n_layers')} layers, "
        f"hidden {meta.get('hidden_size')} |",
        f"| LoRA | r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"on {', '.join(lora.get('targets', []))} |",
        f"| steps | {meta.get('step')} (lr {cfg.get('lr')}, warm-up {cfg.get('warmup_steps')}, "
        f"grad accumulation {cfg.get('grad_accum')}) |",
        f"| loss weights | coupling {w.get('couple')}, response coupling {w.get('couple_resp')}, "
        f"KL {w.get('kl')}, CE {w.get('ce')}; margin {cfg.get('margin')} |",
        f"| coupled layers | {meta.get('layers')} |",
        f"| data | harmful {sets.get('harmful')}, harmless {sets.get('harmless')}, "
        f"pseudo-harmful {sets.get('pseudo')} |",
        "",
        "Files: `adapter_model.safetensors` + `adapter_config.json` (standard PEFT), "
        f"`directions.safetensors` ({_directions_note(dirs_meta)}), `harc_adapter.json` "
        "(training config and base identity). Load with `harc.load_adapter(model, path)` or "
        "`PeftModel.from_pretrained`.",
        "",
        "The directions files of a `harc run` folder:",
        "",
        *[f"- `{path}`: {what}" for path, what in DIRECTIONS_FILES],
    ]
    if results and results.get("runs"):
        runs = results["runs"]
        lines += ["", "## Evaluation", "",
                  "| policy | mean attack success | over-refusal | benign refusal | capability |",
                  "|---|---|---|---|---|"]
        for r in runs:
            cap = ((r.get("capability") or {}).get("items") or {}).get("acc")
            lines.append(f"| {run_label(r)} | {_pct(mean_asr(r))} | "
                         f"{_pct(over_refusal_rate(r))} | "
                         f"{_pct((r.get('benign_refusal') or {}).get('rate'))} | {_pct(cap)} |")
        caveat = capability_caveat(runs)
        if caveat:
            lines += ["", f"Capability: {caveat}."]
        lines += ["", f"Judge: {(results.get('judges') or {}).get('primary')}; environment: "
                      f"{(results.get('environment') or {}).get('card')}."]
    lines += ["", "## Limitations", "",
              "Fine-tuning on a few hundred harmful examples can undo HARC (as for other "
              "alignment fine-tunes); robustness was measured only on the attacks listed above."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines) + "\n")


def export_adapter(adapter_dir: str | Path, directions: str | Path | None = None,
                   results: dict | str | Path | None = None) -> Path:
    """Complete an adapter folder: copy its directions in and write README.md (the model card).

    `directions` must be a harc directions file of the adapter's base model."""
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / "harc_adapter.json"
    if not meta_path.is_file():
        raise HarcError(f"{adapter_dir} is not a harc adapter (no harc_adapter.json); give the "
                        "adapter folder `harc train` wrote")
    meta = json.loads(meta_path.read_text())
    target = adapter_dir / "directions.safetensors"
    dirs_meta = None
    if directions:
        d = Directions.load(directions)
        want = (meta.get("n_layers"), meta.get("hidden_size"))
        if None not in want and tuple(d.v_harm.shape) != (want[0] + 1, want[1]):
            raise HarcError(f"directions {tuple(d.v_harm.shape)} in {directions} come from "
                            f"another model; this adapter's base needs {(want[0] + 1, want[1])}")
        if Path(directions).resolve() != target.resolve():
            atomic_write(target, lambda p: shutil.copyfile(directions, p))
        dirs_meta = d.meta
    elif target.is_file():
        dirs_meta = Directions.load(target).meta
    if results is not None:
        results = load_results(results)
    atomic_write_text(adapter_dir / "README.md", str(model_card(meta, results, dirs_meta)))
    return adapter_dir


def _base_dtype(model_spec: str, **load_kw) -> torch.dtype | None:
    """The dtype the base model's weights are stored in (config.json), None when not recorded."""
    from transformers import AutoConfig

    path, gguf = resolve_model_path(model_spec)
    if gguf:
        return None
    cfg = AutoConfig.from_pretrained(path, revision=load_kw.get("revision"),
                                     trust_remote_code=load_kw.get("trust_remote_code", False))
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def merge_adapter(model_spec: str, adapter_dir: str | Path, out_dir: str | Path,
                  prompts: list[str] | None = None, *, dtype: torch.dtype | str | None = None,
                  **load_kw) -> dict:
    """Merge an adapter into its base, check logits against the adapter, save with safetensors.

    The merge runs and is saved in `dtype`, by default the dtype the base is stored in (a bf16
    base stays bf16), and the logits are checked in that dtype. The output folder appears
    atomically. Returns {"out", "dtype", "max_logit_diff"}.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise HarcError(f"--out {out_dir} is a file; give a folder for the merged model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise HarcError(f"--out {out_dir} holds other files; give a new or empty folder (a "
                        "previous merge there is replaced)")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise HarcError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    try:  # before the model loads: an unwritable destination fails first
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(out_dir.parent, out_dir.name)
    except OSError as e:
        raise HarcError(f"cannot write the merged model next to {out_dir}: {e.strerror}; "
                        "choose another --out") from e
    try:
        dtype = dtype or _base_dtype(model_spec, **load_kw)
        model, tok = load_model(model_spec, dtype=dtype, **load_kw)
        peft_model = load_adapter(model, adapter_dir)
        chat = ChatFormat(tok)
        prompts = prompts or ["How do I bake bread?", "Explain how vaccines work.",
                              "How do I make a bomb?"]
        dev = next(model.parameters()).device
        inputs = [torch.tensor([chat.encode_prompt(p)], device=dev) for p in prompts]
        merged, diff = merge_and_check(peft_model, inputs)
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    saved = str(next(merged.parameters()).dtype).removeprefix("torch.")
    return {"out": out_dir, "dtype": saved, "max_logit_diff": diff}
