"""Adapter export: the PEFT folder completed with its directions and a model card; merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.eval.results import mean_asr, over_refusal_rate
from harc.io import atomic_write_text
from harc.lora import load_adapter, merge_and_check
from harc.models import load_model


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def model_card(meta: dict, results: dict | None = None) -> str:
    """Markdown model card from harc_adapter.json (and results.json when an evaluation exists)."""
    cfg = meta.get("config", {})
    w = cfg.get("weights", {})
    lora = cfg.get("lora", {})
    data = cfg.get("data", {})
    lines = [
        "---",
        f"base_model: {meta.get('model')}",
        "library_name: peft",
        "tags: [harc, safety, lora, jailbreak-robustness]",
        "---",
        f"# HARC adapter for {meta.get('model')}",
        "",
        "A LoRA adapter trained with HARC (Harmfulness-And-Refusal Coupling, arXiv 2607.00572) by "
        f"harc {meta.get('harc_version')}: it couples the model's harmfulness and refusal "
        "directions at the prompt and response sides, with a KL term that keeps benign behaviour "
        "and a CE term that teaches refusals.",
        "",
        "| | |", "|---|---|",
        f"| base model | {meta.get('model')} (revision {meta.get('revision') or 'n/a'}) |",
        f"| architecture | {meta.get('architecture')}, {meta.get('n_layers')} layers, "
        f"hidden {meta.get('hidden_size')} |",
        f"| LoRA | r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
        f"on {', '.join(lora.get('targets', []))} |",
        f"| steps | {meta.get('step')} (lr {cfg.get('lr')}, warm-up {cfg.get('warmup_steps')}, "
        f"grad accumulation {cfg.get('grad_accum')}) |",
        f"| loss weights | coupling {w.get('couple')}, response coupling {w.get('couple_resp')}, "
        f"KL {w.get('kl')}, CE {w.get('ce')}; margin {cfg.get('margin')} |",
        f"| coupled layers | {meta.get('layers')} |",
        f"| data | harmful {data.get('harmful')}, harmless {data.get('harmless')}, "
        f"pseudo-harmful {data.get('pseudo')} |",
        "",
        "Files: `adapter_model.safetensors` + `adapter_config.json` (standard PEFT), "
        "`directions.safetensors` (the directions used), `harc_adapter.json` (training config and "
        "base identity). Load with `harc.load_adapter(model, path)` or `PeftModel.from_pretrained`.",
    ]
    if results and results.get("runs"):
        runs = results["runs"]
        lines += ["", "## Evaluation", "",
                  "| policy | mean attack success | over-refusal | benign refusal | capability |",
                  "|---|---|---|---|---|"]
        for r in runs:
            cap = r.get("capability", {}).get("items", {}).get("acc")
            lines.append(f"| {r['name']} | {_pct(mean_asr(r))} | "
                         f"{_pct(over_refusal_rate(r))} | "
                         f"{_pct(r.get('benign_refusal', {}).get('rate'))} | {_pct(cap)} |")
        lines += ["", f"Judge: {results.get('judges', {}).get('primary')}; environment: "
                      f"{results.get('environment', {}).get('card')}."]
    lines += ["", "## Limitations", "",
              "Fine-tuning on a few hundred harmful examples can undo HARC (as for other "
              "alignment fine-tunes); robustness was measured only on the attacks listed above."]
    return "\n".join(lines) + "\n"


def export_adapter(adapter_dir: str | Path, directions: str | Path | None = None,
                   results: dict | str | Path | None = None) -> Path:
    """Complete an adapter folder: copy its directions and write README.md (the model card)."""
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / "harc_adapter.json"
    if not meta_path.exists():
        raise HarcError(f"{adapter_dir} is not a harc adapter (no harc_adapter.json)")
    meta = json.loads(meta_path.read_text())
    if directions:
        shutil.copyfile(directions, adapter_dir / "directions.safetensors")
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    atomic_write_text(adapter_dir / "README.md", model_card(meta, results))
    return adapter_dir


def merge_adapter(model_spec: str, adapter_dir: str | Path, out_dir: str | Path,
                  prompts: list[str] | None = None, **load_kw) -> float:
    """Merge an adapter into its base, check logits against the adapter, save with safetensors.

    Returns the max |logit difference| between merged and adapter models on a few prompts.
    """
    model, tok = load_model(model_spec, **load_kw)
    peft_model = load_adapter(model, adapter_dir)
    chat = ChatFormat(tok)
    prompts = prompts or ["How do I bake bread?", "Explain how vaccines work.",
                          "How do I make a bomb?"]
    dev = next(model.parameters()).device
    inputs = [torch.tensor([chat.encode_prompt(p)], device=dev) for p in prompts]
    merged, diff = merge_and_check(peft_model, inputs)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return diff
