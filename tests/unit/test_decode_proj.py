"""Merged q/k/v and gate/up projections and the SiLU-product kernel against transformers' own
modules. On CUDA the compiled kernel runs; without a GPU it runs under Triton's interpreter, whose
float-to-bf16 casts truncate: bf16 is compared within rounding there, float32 exactly."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model
from triton_kernels import forget_failures, kernel_device

from harc import _decode_proj as dp

pytestmark = pytest.mark.unit
DEV = kernel_device()
IDS = torch.tensor([[5, 9, 31, 7, 100, 2, 44], [8, 1, 250, 3, 3, 17, 60]])


@pytest.fixture(autouse=True)
def no_failure_remembered(monkeypatch):
    forget_failures(monkeypatch, dp, "HARC_DECODE_PROJ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 1500), (1, 7)])
def test_silu_mul_matches_transformers_rounding(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 4).to(DEV, dtype)
    gate, up = gu.chunk(2, -1)
    ref = F.silu(gate) * up  # transformers: act_fn(gate) in the dtype, then the product
    ours = dp.silu_mul(gu)
    assert ours.shape == ref.shape and ours.dtype == dtype
    if dtype == torch.bfloat16 and DEV == "cpu":  # the interpreter truncates to bf16
        torch.testing.assert_close(ours, ref, rtol=2 ** -6, atol=2 ** -6)
    elif dtype == torch.float16:  # rounded twice, as transformers rounds: a product rounded once
        # differs in about a quarter of the elements; exp's last bit moves a few in 10^4
        assert (ours != ref).float().mean() < 1e-3
        torch.testing.assert_close(ours, ref, rtol=2 ** -9, atol=2 ** -14)  # one ulp
    else:  # exp may differ in the last float32 bit
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def owns_storage(p) -> bool:
    return p.untyped_storage().nbytes() == p.numel() * p.element_size()


@pytest.mark.parametrize("arch, groups", [("qwen2", 4), ("llama", 4), ("gemma", 2)])
def test_merged_model_matches_and_is_restored(arch, groups):
    """Qwen2 has q/k/v biases; Gemma's GELU MLP fails the check and keeps its forward (only its
    q/k/v merge). Afterwards every parameter owns its storage and no forward stays patched."""
    model = tiny_model(arch, n_layers=2, hidden=64).to(DEV)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(input_ids=IDS.to(DEV)).logits
        with dp.merged_projections(model) as n:
            assert n == groups
            attn = model.model.layers[0].self_attn
            assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + \
                attn.q_proj.weight.numel() * attn.q_proj.weight.element_size()
            mlp = model.model.layers[0].mlp
            assert owns_storage(mlp.up_proj.weight) == (arch == "gemma")  # GELU: left alone
            out = model(input_ids=IDS.to(DEV)).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())
    for name, p in model.named_parameters():
        assert owns_storage(p) and p.is_contiguous() and torch.equal(p, before[name]), name


def test_hooked_and_adapted_projections_keep_their_own_path():
    model = tiny_model("llama", n_layers=2, hidden=64).to(DEV)
    calls = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *a: calls.append("k"))
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: calls.append("up"))
    with torch.no_grad(), dp.merged_projections(model) as n:
        assert n == 2  # layer 0's MLP and layer 1's attention
        assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__
        model(input_ids=IDS.to(DEV))
    assert calls == ["k", "up"]


def test_a_follower_called_with_another_input_computes_its_own():
    model = tiny_model("qwen2", n_layers=1, hidden=64).to(DEV)
    attn = model.model.layers[0].self_attn
    x, y = torch.randn(2, 3, 64, device=DEV), torch.randn(2, 3, 64, device=DEV)
    with torch.no_grad():
        want = attn.k_proj(y), attn.v_proj(x)
        with dp.merged_projections(model):
            attn.q_proj(x)
            got = attn.k_proj(y), attn.v_proj(x)  # k with another input; v with the lead's
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
