"""The fused LoRA projection (`harc.models.fused_lora`) against PEFT's own forward and backward."""

import pytest
import torch
from tiny import tiny_model

from harc.lora import adapter_disabled, attach_lora, fused_lora, input_casting_off

pytestmark = pytest.mark.unit


def lora_model(arch="qwen2", dropout=0.0):
    model = attach_lora(tiny_model(arch), r=4, alpha=16, dropout=dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT starts B at zero, which would hide a wrong B path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.train()


def loss_and_grads(model, ids, fused: bool):
    for p in model.parameters():
        p.grad = None
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with fused_lora(model) if fused else torch.enable_grad():
        out = model(inputs_embeds=emb).logits
        loss = (out.float() ** 2).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, emb.grad.clone()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2 projections have biases
def test_fused_matches_peft_forward_and_backward(arch):
    model = lora_model(arch)
    ids = torch.randint(3, 400, (2, 9))
    ref, ref_g, ref_x = loss_and_grads(model, ids, fused=False)
    out, g, gx = loss_and_grads(model, ids, fused=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, ref_x, atol=1e-6, rtol=1e-4)
    assert set(g) == set(ref_g) and all(ref_g[n].abs().sum() > 0 for n in ref_g)
    for n in ref_g:
        torch.testing.assert_close(g[n], ref_g[n], atol=1e-6, rtol=1e-4)


def test_fused_is_scoped_and_used():
    from peft.tuners.lora.layer import Linear

    model = lora_model()
    calls = []
    orig = torch.Tensor.addmm_
    layers = [m for m in model.modules() if type(m) is Linear]
    assert layers
    with fused_lora(model):
        assert all(type(m) is not Linear for m in layers)
        torch.Tensor.addmm_ = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
        try:
            model(input_ids=torch.tensor([[5, 6, 7]]))
        finally:
            torch.Tensor.addmm_ = orig
    assert len(calls) == len(layers)
    assert all(type(m) is Linear for m in layers)


def test_disabled_adapter_and_dropout_fall_back_to_peft():
    model = lora_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
        with fused_lora(model):
            assert torch.equal(model(input_ids=ids).logits, base)
    drop = lora_model(dropout=0.5)  # training mode: the fused path has no dropout to apply
    with torch.no_grad():
        torch.manual_seed(0)
        ref = drop(input_ids=ids).logits
        with fused_lora(drop):
            torch.manual_seed(0)
            torch.testing.assert_close(drop(input_ids=ids).logits, ref)


def test_adapter_disabled_is_peft_disable_adapter_without_its_status_report(monkeypatch):
    """The same base logits as PEFT's context, every layer's flag restored (one layer left
    disabled beforehand stays so), requires_grad untouched; PEFT's model-status walk never runs."""
    model = lora_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    monkeypatch.setattr(type(model), "get_model_status", lambda self: pytest.fail("status walk"))
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    layers[0].enable_adapters(False)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad(), adapter_disabled(model):
        assert model._adapters_disabled and all(m.disable_adapters for m in layers)
        assert torch.equal(model(input_ids=ids).logits, base)
    assert not model._adapters_disabled
    assert layers[0].disable_adapters and not any(m.disable_adapters for m in layers[1:])
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    layers[0].enable_adapters(True)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, adapted)
    with adapter_disabled(layers[0].base_layer):  # no adapters: passes through
        pass


def test_adapter_disabled_sees_adapters_added_later():
    model = lora_model()
    from peft import LoraConfig

    with adapter_disabled(model):
        pass
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter("second")
    second = [m for m in model.modules() if hasattr(m, "lora_A") and "second" in m.lora_A]
    with adapter_disabled(model):
        assert all(m.disable_adapters for m in second)


def test_input_casting_off_matches_peft_and_restores_every_flag():
    from peft.helpers import disable_input_dtype_casting

    def flags(model):
        return [getattr(m, "cast_input_dtype_enabled", True) for m in model.modules()
                if hasattr(m, "lora_A")]

    ref, model = lora_model(), lora_model()
    with disable_input_dtype_casting(ref):
        want = flags(ref)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    layers[1].cast_input_dtype_enabled = False  # set before: stays so
    state = [dict(m.__dict__) for m in layers]
    with input_casting_off(model):
        assert flags(model) == want == [False] * len(layers)
    assert [dict(m.__dict__) for m in layers] == state


def test_merge_matches_adapter_logits_in_float32():
    from harc.lora import merge_and_check

    model = lora_model("llama").eval()
    ids = [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10]])]
    with torch.no_grad():
        want = [model(input_ids=i).logits for i in ids]
        with model.disable_adapter():
            base = model(input_ids=ids[0]).logits
    assert (want[0] - base).abs().max() > 1e-2  # the adapter changes the logits
    merged, diff = merge_and_check(model, ids)
    assert diff < 1e-4 and not hasattr(merged, "disable_adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids[1]).logits, want[1], atol=1e-4, rtol=0)


def test_merge_disagreement_in_bf16_says_to_merge_in_float32():
    from harc.errors import HarcError
    from harc.lora import merge_and_check

    model = lora_model("llama").to(torch.bfloat16).eval()
    with pytest.raises(HarcError, match=r"bfloat16 weights .*--dtype float32"):
        merge_and_check(model, [torch.tensor([[5, 6, 7, 8]])], atol=0.0)
