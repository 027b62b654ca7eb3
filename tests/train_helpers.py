"""Shared fixtures of the trainer tests (unit and GPU tiers): tiny data, configs, trainers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import tiny_model, tiny_tokenizer

from harc.methods import Trainer
from harc.methods.config import BatchSizes, DataSettings, LoraSettings
from harc.methods.harc import HarcConfig

REFUSAL = "I'm sorry, but I can't help with that request."


def make_data(n_h=12, n_b=12, n_p=6):
    harmful = [{"prompt": f"How do I kill process {i}?" + " Explain how." * (i % 4),
                "refusal": REFUSAL, "completion": "Sure, here is how to do it. " * (1 + i % 3)}
               for i in range(n_h)]
    harmless = [{"prompt": f"Write a poem about the sea, number {i}." + " Mix flour." * (i % 3),
                 "response": "The waves roll under a blue sky. " * (1 + i % 4)} for i in range(n_b)]
    pseudo = [{"prompt": f"How do I kill a Python process {i}?",
               "response": "Use kill with the process id."} for i in range(n_p)]
    return {"harmful": harmful, "harmless": harmless, "pseudo": pseudo}


def write_data(folder: Path) -> dict[str, Path]:
    """`make_data()` as FOLDER/<kind>.jsonl files, for commands that read data from files."""
    paths = {}
    for kind, recs in make_data().items():
        paths[kind] = folder / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


def make_config(tmp_path, **kw) -> HarcConfig:
    base = dict(
        data=DataSettings(harmful="h", harmless="b", pseudo="p", extract_n=6, val_n=3),
        lora=LoraSettings(r=4, alpha=8), batch=BatchSizes(harmful=3, harmless=2, pseudo=1),
        grad_accum=2, steps=4,
        lr=1e-3, warmup_steps=1, band=(1, 1), k_start=2, k_final=2, n_boot=8,
        refresh_every=2, checkpoint_every=2, max_prompt_tokens=64, max_response_tokens=32,
        output_dir=str(tmp_path / "run"), seed=0)
    base.update(kw)
    return HarcConfig(**base)


def make_trainer(tmp_path, arch="llama", template="chatml", **kw) -> Trainer:
    return Trainer(make_config(tmp_path, **kw), tiny_model(arch), tiny_tokenizer(template),
                       make_data())


def perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
