"""The Triton RMSNorm against transformers' RMSNorm modules, and its installation into a model. On
CUDA the compiled kernel runs; without a GPU it runs under Triton's interpreter (see
tests/unit/test_decode_attn.py), whose float-to-bf16 casts truncate: bf16 is compared within
rounding there, float16 (rounded to nearest, like the GPU) almost bit for bit."""


import pytest
import torch
from tiny import tiny_model
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_rms_norm_rounds_the_sum_then_normalises_it(dtype):
    m, x = norm(Qwen2RMSNorm, 96, dtype, seed=3)
    y = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    s, out = dn.add_rms_norm(x, y, m.weight, m.variance_epsilon)
    if dtype == torch.bfloat16 and DEV == "cpu":  # the interpreter truncates to bf16
        torch.testing.assert_close(s, x + y, rtol=2 ** -7, atol=1e-3)
    else:  # the sum rounded once, as torch's add rounds it, and normalised as rms_norm does
        assert torch.equal(s, x + y)
    assert torch.equal(out, dn.rms_norm(s, m.weight, m.variance_epsilon))


def run_layers(model, ids):
    out = []
    hook = model.model.norm.register_forward_hook(lambda _m, a, _o: out.append(a[0]))
    try:
        logits = model(input_ids=ids).logits
    finally:
        hook.remove()
    return logits, out[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_residuals_leave_the_layers_outputs_unchanged(arch):
    model = tiny_model(arch, n_layers=3, hidden=64).to(DEV)
    ids = torch.tensor([[5, 9, 31, 7, 100, 2], [8, 8, 1, 50, 3, 4]], device=DEV)
    blocks = list(model.model.layers)
    with torch.no_grad():
        ref, ref_h = run_layers(model, ids)
        with dn.fused_residuals(blocks) as n, dn.fused_norms(model):
            assert n == 3 and all("forward" in b.__dict__ for b in blocks)
            calls = []
            for b in blocks:  # layers after the first take their input norm from the one before
                b.input_layernorm.register_forward_hook(lambda m, a, o: calls.append(m))
            inside, inside_h = run_layers(model, ids)
        for b in blocks:
            b.input_layernorm._forward_hooks.clear()
    assert calls == [blocks[0].input_layernorm]
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(inside_h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inside, ref, rtol=1e-5, atol=1e-5)


def test_layers_the_fused_forward_would_change_keep_their_own():
    model = tiny_model("llama", n_layers=3, hidden=64).to(DEV)
    blocks = list(model.model.layers)
    hooked = blocks[0].post_attention_layernorm.register_forward_hook(lambda *a: None)
    blocks[1].extra = torch.nn.Identity()  # a fifth child: not a Llama-style layer
    with dn.fused_residuals(blocks) as n:
        assert n == 1 and "forward" in blocks[2].__dict__
        assert not any("forward" in b.__dict__ for b in blocks[:2])
    hooked.remove()


class ScaledLayer(LlamaDecoderLayer):
    """Another residual formula under the Llama layer's children: h + 0.5 * attn."""

    def forward(self, hidden_states, **kwargs):
        a = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
        h = hidden_states + 0.5 * a
        return h + self.mlp(self.post_attention_layernorm(h))


def test_a_layer_class_whose_forward_differs_is_left_alone():
    model = tiny_model("llama", n_layers=2, hidden=64).to(DEV)
    for b in model.model.layers:
        b.__class__ = ScaledLayer
    with dn.fused_residuals(list(model.model.layers)) as n:
        assert n == 0
