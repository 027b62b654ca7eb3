"""The trainer's CUDA path: bf16 under autocast with float32 LoRA weights, and activation
checkpointing with the coupling hooks (transformers versions differ in where hooks run)."""

import contextlib
from pathlib import Path

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from train_helpers import make_config, make_data, perturb_lora

import harc.methods.harc as hm
from harc.methods import Trainer
from harc.methods.batching import collate
from harc.methods.harc import micro_step
from harc.methods.step import compiled_blocks, set_checkpointing

pytestmark = pytest.mark.gpu


def _trainer(tmp: Path, **kw) -> Trainer:
    model = tiny_model("qwen2", hidden=64).to("cuda", torch.bfloat16)
    return Trainer(make_config(tmp, **kw), model, tiny_tokenizer("qwen2.5"), make_data())


def test_bf16_checkpointing_matches_and_lora_stays_float32(tmp_path):
    tr = _trainer(tmp_path)
    assert all(p.dtype == torch.float32 for p in tr.params)
    perturb_lora(tr.model)
    mb = collate(tr.sampler(0), tr.chat.tail_len, 0).to("cuda")
    dirs = tr.method.dirs.to("cuda")
    grads = []
    for ckpt in (False, True):
        set_checkpointing(tr.model, ckpt)
        tr.model.train()
        for p in tr.params:
            p.grad = None
        terms, _ = micro_step(tr.model, mb, dirs, tr.method.layers, margin=0.5, backward_scale=1.0)
        assert all(torch.isfinite(v) for v in terms.values())
        grads.append([p.grad.float().clone() for p in tr.params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)
    assert sum(g.abs().sum() for g in grads[1]) > 0


def test_short_cuda_run_with_checkpointing(tmp_path):
    tr = _trainer(tmp_path, gradient_checkpointing=True, steps=2,
                  refresh_every=1)
    out = tr.train()
    assert (out / "adapter_model.safetensors").is_file()


def test_fused_lora_and_compiled_blocks_match_peft_in_bf16(tmp_path):
    tr = _trainer(tmp_path)
    perturb_lora(tr.model)
    tr.model.train()
    mb = collate(tr.sampler(0), tr.chat.tail_len, 0).to("cuda")
    dirs, fused, out = tr.method.dirs.to("cuda"), hm.fused_lora, []
    for variant in ("peft", "fused", "compiled"):
        hm.fused_lora = contextlib.nullcontext if variant == "peft" else fused
        try:
            with compiled_blocks(tr.model, variant == "compiled"):
                for p in tr.params:
                    p.grad = None
                terms, _ = micro_step(tr.model, mb, dirs, tr.method.layers, margin=0.5,
                                      backward_scale=1.0)
        finally:
            hm.fused_lora = fused
        out.append((sum(terms.values()), [p.grad.float().clone() for p in tr.params]))
    for loss, grads in out[1:]:
        torch.testing.assert_close(loss, out[0][0], atol=2e-2, rtol=1e-2)
        for a, b in zip(grads, out[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)
