"""Shared pieces of the serve unit tests."""

from __future__ import annotations

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
