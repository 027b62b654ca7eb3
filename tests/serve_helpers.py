"""Shared pieces of the serve unit tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import tiny_model

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def user(text: str, model: str = "tiny", **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def peft_two_adapters(seed: int = 0):
    """A tiny model with two random LoRA adapters "alpha" and "beta" (B is random too, so each
    adapter changes the output)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(), cfg, adapter_name="alpha")
    torch.manual_seed(seed + 1)
    model.add_adapter("beta", cfg)
    return model.eval()


def garak_block(report: Path) -> dict:
    """A `redteam` block of two served names from a garak report: "m" as garak saw it, and
    "m+keyword" with the DAN prompt blocked (no mitigation bypass)."""
    from harc.serve.redteam import parse_report

    rep = parse_report(report)
    blocked = json.loads(json.dumps(rep["probes"]))
    blocked["dan.Dan_11_0"]["detectors"]["mitigation.MitigationBypass"].update(hits=0, rate=0.0)
    return {"tool": "garak", "garak_version": "0.17.1", "model": "m",
            "probes": ["dan.Dan_11_0", "encoding.InjectBase64"],
            "settings": {"generations": 1, "prompt_cap": 6, "max_tokens": 48},
            "targets": [{"name": "m", "adapter": None, "layers": [], "wall_s": 3.0,
                         "probes": rep["probes"], "examples": rep["examples"]},
                        {"name": "m+keyword", "adapter": None, "layers": ["keyword"],
                         "wall_s": 2.0, "probes": blocked, "examples": []}]}
