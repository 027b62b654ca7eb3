"""The Triton rotary embedding against transformers' `apply_rotary_pos_emb`, and its installation
into a model's modules. On CUDA the compiled kernel runs; without a GPU it runs under Triton's
interpreter (see tests/unit/test_decode_attn.py), whose float-to-bf16 casts truncate: bf16 is
compared within rounding there, float32 and float16 (rounded to nearest) exactly."""


import pytest
import torch
from tiny import tiny_model
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from triton_kernels import forget_failures, kernel_device

from harc import _decode_rope as dr

pytestmark = pytest.mark.unit
DEV = kernel_device()


@pytest.fixture(autouse=True)
def no_failure_remembered(monkeypatch):
    forget_failures(monkeypatch, dr, "HARC_DECODE_ROPE")


def inputs(b, hq, hk, t, d, dtype, cos_rows=None, seed=0):
    """q and k laid out as the attention modules make them ([B, T, H, D] transposed), and the
    cos / sin of random angles."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g).transpose(1, 2)
    ang = torch.randn(cos_rows or b, t, d // 2, generator=g) * 4
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return [x.to(DEV, dtype) for x in (q, k, cos, sin)]


@pytest.mark.parametrize("module", [modeling_llama, modeling_qwen2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 1, 1, 128), (2, 4, 4, 5, 64), (1, 8, 2, 3, 8),
                                   (2, 12, 8, 2, 32)])  # 8 heads a program: the last 4 masked
def test_matches_transformers(module, dtype, shape):
    args = inputs(*shape, dtype, seed=shape[0])
    ref, ours = module.apply_rotary_pos_emb(*args), dr.rotate(*args)
    for r, o in zip(ref, ours):
        assert o.shape == r.shape and o.dtype == r.dtype
        # the same layout (a dimension of size 1 has no stride that matters)
        assert [st for st, n in zip(o.stride(), o.shape) if n > 1] == \
            [st for st, n in zip(r.stride(), r.shape) if n > 1]
        if dtype == torch.bfloat16 and DEV == "cpu":  # the interpreter truncates to bf16
            torch.testing.assert_close(o, r, rtol=2 ** -6, atol=2 ** -6)
        else:
            assert torch.equal(o, r)


def test_one_row_of_cos_serves_every_row():
    args = inputs(4, 2, 2, 3, 32, torch.float32, cos_rows=1)
    for r, o in zip(modeling_qwen2.apply_rotary_pos_emb(*args), dr.rotate(*args)):
        assert torch.equal(o, r)


@pytest.mark.parametrize("change", ["head dim 80", "head dim 4", "dtypes differ", "cos of 2 rows",
                                    "3D query"])
def test_fits_refuses_what_the_kernel_does_not_take(change):
    d = {"head dim 80": 80, "head dim 4": 4}.get(change, 64)
    q, k, cos, sin = inputs(3, 2, 2, 1, d, torch.float32)
    if change == "dtypes differ":
        k = k.double()
    elif change == "cos of 2 rows":
        cos, sin = cos[:2], sin[:2]
    elif change == "3D query":
        q = q[:, :, 0]
    assert dr.fits(*inputs(3, 2, 2, 1, 64, torch.float32))
    assert not dr.fits(q, k, cos, sin)


def test_calls_the_kernel_does_not_take_go_to_the_original():
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return q, k

    args = inputs(2, 2, 2, 1, 64, torch.float32)
    dr._fused(original, *args, unsqueeze_dim=2)
    grad = [a.clone().requires_grad_() for a in args[:2]] + args[2:]
    dr._fused(original, *grad)
    assert calls == [2, 1]
    dr._fused(original, *args)  # this one the kernel takes
    assert calls == [2, 1]


def test_fused_rotary_patches_the_modules_and_restores_them():
    model = tiny_model("qwen2", n_layers=2, hidden=64).to(DEV)
    ids = torch.tensor([[5, 9, 31, 7, 100, 2]], device=DEV)
    original = modeling_qwen2.apply_rotary_pos_emb
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with dr.fused_rotary(model) as n:
            assert n == 1 and modeling_qwen2.apply_rotary_pos_emb is not original
            with dr.fused_rotary(model) as inner:  # nested: already patched, left alone
                assert inner == 0
            out = model(input_ids=ids).logits
    assert modeling_qwen2.apply_rotary_pos_emb is original
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_function_the_kernel_does_not_reproduce_is_kept(monkeypatch):
    def partial_rotary(q, k, cos, sin, unsqueeze_dim=1):  # e.g. a model that rotates half a head
        return q * 2, k

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", partial_rotary)
    model = tiny_model("qwen2", n_layers=1, hidden=64).to(DEV)
    with dr.fused_rotary(model) as n:
        assert n == 0 and modeling_qwen2.apply_rotary_pos_emb is partial_rotary
