"""HARC loss terms against hand-computed values (HARC-METHOD §4)."""

import math

import pytest
import torch

from harc.losses import (
    coupling_hinge,
    coupling_loss,
    head_kl_retain,
    head_refusal_ce,
    kl_retain,
    prompt_coupling,
    refusal_ce,
    response_coupling,
    total_loss,
)

pytestmark = pytest.mark.unit
M = 0.5


def test_coupling_hinge_by_hand():
    # 2 layers x 3 samples; sample 0 harmful, 1 and 2 retain.
    p_r = torch.tensor([[0.2, 0.1, -0.3], [0.6, -0.1, 0.0]])
    p_h = torch.tensor([[0.7, 0.4, 0.2], [-0.2, 0.0, 0.6]])
    harmful = torch.tensor([True, False, False])
    per = coupling_hinge(p_r, p_h, harmful, M)
    # harmful: relu(m-p_r)+relu(m-p_h); retain: relu(p_r)+relu(p_h)
    want = torch.tensor([[0.3 + 0.0, 0.1 + 0.4, 0.0 + 0.2],
                         [0.0 + 0.7, 0.0 + 0.0, 0.0 + 0.6]])
    torch.testing.assert_close(per, want)
    # mean over samples (1.0/3, 1.3/3), then over layers
    assert coupling_loss(p_r, p_h, harmful, M).item() == pytest.approx(2.3 / 6, abs=1e-6)


def test_prompt_coupling_on_vectors_and_detached_directions():
    v_ref = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_harm = torch.tensor([[0.0, 1.0]], requires_grad=True)
    h_post = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]], requires_grad=True)  # cos 0.6, 0
    h_inst = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]], requires_grad=True)  # cos .7071 both
    loss, p_r, p_h = prompt_coupling(h_inst, h_post, v_harm, v_ref, torch.tensor([True, False]), M)
    torch.testing.assert_close(p_r, torch.tensor([[0.6, 0.0]]))
    torch.testing.assert_close(p_h, torch.tensor([[math.sqrt(0.5)] * 2]))
    # harmful row: relu(.5-.6)+relu(.5-.707) = 0; retain row: relu(0)+relu(.707)
    assert loss.item() == pytest.approx(math.sqrt(0.5) / 2, abs=1e-6)
    loss.backward()
    assert v_ref.grad is None and v_harm.grad is None  # directions are detached
    assert h_inst.grad is not None and h_inst.grad[0, 1].abs().sum() > 0


def test_response_coupling_by_hand():
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v_ref_resp, v_harm_resp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, p_r, p_h = response_coupling(h, v_harm_resp, v_ref_resp, torch.tensor([True, False]), M)
    torch.testing.assert_close(p_r, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(p_h, torch.tensor([[0.0, 1.0]]))
    # harmful: relu(.5-1)+relu(.5-0) = .5; retain: relu(0)+relu(1) = 1
    assert loss.item() == pytest.approx(0.75, abs=1e-6)


def test_kl_is_base_to_adapted_token_mean():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    adapted = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    # token 0: KL([.5,.5] || [.75,.25]) = .5 ln(4/3); token 1: identical -> 0
    assert kl_retain(adapted, base).item() == pytest.approx(0.5 * math.log(4 / 3) / 2, abs=1e-6)
    # the other direction would give 0.75 ln 1.5 + 0.25 ln .5 (not what we want)
    assert kl_retain(base, adapted).item() != pytest.approx(kl_retain(adapted, base).item())


def test_ce_token_mean():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1])
    want = (-math.log(0.75) + math.log(2.0)) / 2
    assert refusal_ce(logits, targets).item() == pytest.approx(want, abs=1e-6)


def test_empty_categories_are_zero_not_nan():
    e = torch.zeros(2, 0)
    assert coupling_loss(e, e, torch.zeros(0, dtype=torch.bool), M).item() == 0.0
    assert kl_retain(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0
    assert refusal_ce(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).item() == 0.0
    head = torch.nn.Linear(4, 5)
    assert head_kl_retain(head, torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0
    assert head_refusal_ce(head, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).item() == 0.0
    # only harmful rows, or only retain rows: finite
    p = torch.rand(2, 3)
    for mask in (torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)):
        assert torch.isfinite(coupling_loss(p, p, mask, M))


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_head_terms_match_full_logits(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 11, bias=False).requires_grad_(False)
    h = torch.randn(7, 4, requires_grad=True)
    hb = torch.randn(7, 4)
    t = torch.randint(0, 11, (7,))
    ce = head_refusal_ce(head, h, t, chunk)
    (g_ce,) = torch.autograd.grad(ce, h)
    ce_ref = refusal_ce(head(h), t)
    (g_ce_ref,) = torch.autograd.grad(ce_ref, h)
    torch.testing.assert_close(ce, ce_ref)
    torch.testing.assert_close(g_ce, g_ce_ref)
    kl = head_kl_retain(head, h, hb, chunk)
    (g_kl,) = torch.autograd.grad(kl, h)
    kl_ref = kl_retain(head(h), head(hb))
    (g_kl_ref,) = torch.autograd.grad(kl_ref, h)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(g_kl, g_kl_ref)


def test_total_loss_weights():
    terms = {k: torch.tensor(v) for k, v in
             {"couple": 1.0, "couple_resp": 2.0, "kl": 0.5, "ce": 3.0}.items()}
    w = {"couple": 1.0, "couple_resp": 1.0, "kl": 10.0, "ce": 1.0}
    assert total_loss(terms, w).item() == pytest.approx(1 + 2 + 5 + 3)
