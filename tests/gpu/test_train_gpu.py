"""The trainer's CUDA path: bf16 under autocast with float32 LoRA weights, and activation
checkpointing with the coupling hooks (transformers versions differ in where hooks run)."""

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_train import make_config, make_data, perturb_lora  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from harc.train import HarcTrainer, collate, micro_step, set_checkpointing  # noqa: E402

pytestmark = pytest.mark.gpu


def _trainer(tmp: Path, **kw) -> HarcTrainer:
    model = tiny_model("qwen2", hidden=64).to("cuda", torch.bfloat16)
    return HarcTrainer(make_config(tmp, **kw), model, tiny_tokenizer("qwen2.5"), make_data())


def test_bf16_checkpointing_matches_and_lora_stays_float32(tmp_path=None):
    tr = _trainer(Path(tmp_path or tempfile.mkdtemp()))
    assert all(p.dtype == torch.float32 for p in tr.params)
    perturb_lora(tr.model)
    mb = collate(tr.micro_batch_examples(0), tr.chat.tail_len, 0).to("cuda")
    dirs = tr.dirs.to("cuda")
    grads = []
    for ckpt in (False, True):
        set_checkpointing(tr.model, ckpt)
        tr.model.train()
        for p in tr.params:
            p.grad = None
        terms, _ = micro_step(tr.model, mb, dirs, tr.layers, margin=0.5, backward_scale=1.0)
        assert all(torch.isfinite(v) for v in terms.values())
        grads.append([p.grad.float().clone() for p in tr.params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)
    assert sum(g.abs().sum() for g in grads[1]) > 0


def test_short_cuda_run_with_checkpointing(tmp_path=None):
    tr = _trainer(Path(tmp_path or tempfile.mkdtemp()), gradient_checkpointing=True, steps=2,
                  refresh_every=1)
    out = tr.train()
    assert (out / "adapter_model.safetensors").is_file()


def test_fused_lora_and_compiled_blocks_match_peft_in_bf16(tmp_path=None):
    import contextlib

    import harc.train as ht

    tr = _trainer(Path(tmp_path or tempfile.mkdtemp()))
    perturb_lora(tr.model)
    tr.model.train()
    mb = collate(tr.micro_batch_examples(0), tr.chat.tail_len, 0).to("cuda")
    dirs, fused, out = tr.dirs.to("cuda"), ht.fused_lora, []
    for variant in ("peft", "fused", "compiled"):
        ht.fused_lora = contextlib.nullcontext if variant == "peft" else fused
        try:
            with ht.compiled_blocks(tr.model, variant == "compiled"):
                for p in tr.params:
                    p.grad = None
                terms, _ = micro_step(tr.model, mb, dirs, tr.layers, margin=0.5,
                                      backward_scale=1.0)
        finally:
            ht.fused_lora = fused
        out.append((sum(terms.values()), [p.grad.float().clone() for p in tr.params]))
    for loss, grads in out[1:]:
        torch.testing.assert_close(loss, out[0][0], atol=2e-2, rtol=1e-2)
        for a, b in zip(grads, out[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


if __name__ == "__main__":  # for machines without pytest
    test_bf16_checkpointing_matches_and_lora_stays_float32()
    test_short_cuda_run_with_checkpointing()
    test_fused_lora_and_compiled_blocks_match_peft_in_bf16()
    print("gpu tests passed")
