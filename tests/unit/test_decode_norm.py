"""The Triton RMSNorm against transformers' RMSNorm modules, and its installation into a model. On
CUDA the compiled kernel runs; without a GPU it runs under Triton's interpreter (see
tests/unit/test_decode_attn.py), whose float-to-bf16 casts truncate: bf16 is compared within
rounding there, float16 (rounded to nearest, like the GPU) almost bit for bit."""


import pytest
import torch
from tiny import tiny_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from triton_kernels import forget_failures, kernel_device

from harc import _decode_norm as dn
from harc.errors import HarcError

pytestmark = pytest.mark.unit
DEV = kernel_device()


@pytest.fixture(autouse=True)
def no_failure_remembered(monkeypatch):
    forget_failures(monkeypatch, dn, "HARC_DECODE_NORM")


def norm(cls, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cls(n, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(1 + 0.5 * torch.randn(n, generator=g))
    x = torch.randn(4, 3, n, generator=g) * torch.tensor([0.01, 1.0, 40.0])[:, None]
    return m.to(DEV, dtype), x.to(DEV, dtype)


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 96, 576])
def test_matches_transformers_rmsnorm(cls, dtype, n):
    m, x = norm(cls, n, dtype, seed=n)
    with torch.no_grad():
        ref, ours = m(x), dn.rms_norm(x, m.weight, m.variance_epsilon)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    elif dtype == torch.float16 or DEV == "cuda":  # round to nearest: transformers' two roundings
        assert (ours == ref).float().mean() > 0.99
        torch.testing.assert_close(ours, ref, rtol=2 ** -9, atol=1e-3)
    else:
        torch.testing.assert_close(ours, ref, rtol=2 ** -6, atol=1e-3)


def test_fused_norms_swap_the_llama_style_norms_and_restore_them():
    model = tiny_model("llama", n_layers=2, hidden=64).to(DEV)
    ids = torch.tensor([[5, 9, 31, 7, 100, 2]], device=DEV)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with dn.fused_norms(model) as n:
            norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
            assert n == len(norms) == 2 * 2 + 1 and all("forward" in m.__dict__ for m in norms)
            inside = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(inside, ref, rtol=1e-5, atol=1e-5)


class OffsetRMSNorm(LlamaRMSNorm):
    """Gemma's formula, (1 + weight) * x_hat, under Llama's attribute names."""

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1 + self.weight) * h.to(x.dtype)


def test_norms_that_compute_something_else_or_are_already_wrapped_are_left_alone():
    a, _ = norm(OffsetRMSNorm, 64, torch.float32)
    b, _ = norm(LlamaRMSNorm, 64, torch.float32)
    c, _ = norm(LlamaRMSNorm, 64, torch.float32)
    wrapper = c.forward  # e.g. accelerate's offloading hook replaces forward per instance
    c.forward = wrapper
    model = torch.nn.Sequential(a, b, c)
    with dn.fused_norms(model) as n:
        assert n == 1 and "forward" not in a.__dict__ and "forward" in b.__dict__
        assert c.forward is wrapper
    assert "forward" not in b.__dict__ and c.forward is wrapper


def test_a_failing_kernel_keeps_transformers_norms_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("ptxas fatal\ndetails")

    monkeypatch.setattr(dn, "_kernel", broken)
    model = torch.nn.Sequential(norm(LlamaRMSNorm, 64, torch.float32)[0])
    with pytest.warns(UserWarning, match="Triton RMSNorm failed .*ptxas fatal"):
        with dn.fused_norms(model) as n:
            assert n == 0 and "forward" not in model[0].__dict__
    monkeypatch.setenv("HARC_DECODE_NORM", "triton")
    assert not dn.enabled(torch.device(DEV))


def test_the_environment_variable_picks_the_path(monkeypatch):
    dev = torch.device(DEV)
    assert dn.enabled(dev) == (DEV == "cuda")
    monkeypatch.setenv("HARC_DECODE_NORM", "triton")
    assert dn.enabled(dev)
    monkeypatch.setenv("HARC_DECODE_NORM", "torch")
    assert not dn.enabled(dev)
    monkeypatch.setenv("HARC_DECODE_NORM", "fused")
    with pytest.raises(HarcError, match="HARC_DECODE_NORM must be"):
        dn.enabled(dev)
