"""HARC loss terms against hand-computed values (HARC-METHOD §4)."""

import math

import pytest
import torch

from harc.losses import (
    coupling_hinge,
    coupling_loss,
    hard_mean,
    head_kl_retain,
    head_refusal_ce,
    kl_retain,
    prompt_coupling,
    pseudo_refusal,
    read_projection,
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


# ---- opt-in terms (HarcConfig keys), each against its formula on fixed inputs

def test_read_projection_max_and_softmax_by_hand():
    p = torch.tensor([[[0.1, 0.6, -0.2, 0.9], [0.3, -0.1, 0.2, 0.0]]])  # [L=1, B=2, T=4]
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    torch.testing.assert_close(read_projection(p, mask, "max"), torch.tensor([[0.6, 0.2]]))
    t = 0.5
    w0 = torch.softmax(torch.tensor([0.1, 0.6, -0.2]) / t, 0)
    w1 = torch.softmax(torch.tensor([-0.1, 0.2, 0.0]) / t, 0)
    want = torch.tensor([[(w0 * torch.tensor([0.1, 0.6, -0.2])).sum(),
                          (w1 * torch.tensor([-0.1, 0.2, 0.0])).sum()]])
    torch.testing.assert_close(read_projection(p, mask, "softmax", t), want)
    # between the mean and the maximum; near the maximum at a low temperature
    soft = read_projection(p, mask, "softmax", 1e-3)
    torch.testing.assert_close(soft, torch.tensor([[0.6, 0.2]]), atol=1e-4, rtol=0)
    # the gradient of "max" reaches only the maximal read position
    q = p.clone().requires_grad_(True)
    read_projection(q, mask, "max").sum().backward()
    assert q.grad[0, 0].tolist() == [0, 1, 0, 0] and q.grad[0, 1].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError):
        read_projection(p, mask, "mean")


def test_hard_mean_by_hand():
    per = torch.tensor([[0.0, 0.4, 0.1, 0.3], [0.2, 0.0, 0.0, 0.0]])
    assert hard_mean(per, 1.0).item() == pytest.approx((0.8 / 4 + 0.2 / 4) / 2)
    # hardest half: ceil(0.5 * 4) = 2 per layer -> (0.4 + 0.3) / 2 and (0.2 + 0) / 2
    assert hard_mean(per, 0.5).item() == pytest.approx((0.35 + 0.1) / 2)
    # ceil(0.1 * 4) = 1 value: the maximum of each layer
    assert hard_mean(per, 0.1).item() == pytest.approx((0.4 + 0.2) / 2)
    valid = torch.tensor([True, False, True, True])  # n = 3; frac 0.5 -> 2 of 0.0, 0.1, 0.3
    assert hard_mean(per, 0.5, valid).item() == pytest.approx(((0.3 + 0.1) / 2 + 0.2 / 2) / 2)
    assert hard_mean(per, 1.0, valid).item() == pytest.approx((0.4 / 3 + 0.2 / 3) / 2)
    none = hard_mean(per.requires_grad_(True), 0.5, torch.zeros(4, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(per.grad).all()


def test_coupling_loss_defaults_take_the_papers_mean_and_options_change_it():
    p_r = torch.tensor([[0.2, 0.1, -0.3], [0.6, -0.1, 0.0]])
    p_h = torch.tensor([[0.7, 0.4, 0.2], [-0.2, 0.0, 0.6]])
    harmful = torch.tensor([True, False, False])
    per = coupling_hinge(p_r, p_h, harmful, M)  # [[.3, .5, .2], [.7, 0, .6]]
    assert coupling_loss(p_r, p_h, harmful, M).item() == pytest.approx(2.3 / 6, abs=1e-6)
    got = coupling_loss(p_r, p_h, harmful, M, hard_frac=1 / 3)  # the maximum of each layer
    assert got.item() == pytest.approx((0.5 + 0.7) / 2, abs=1e-6)
    valid = torch.tensor([True, False, True])
    got = coupling_loss(p_r, p_h, harmful, M, valid=valid)
    assert got.item() == pytest.approx(((0.3 + 0.2) / 2 + (0.7 + 0.6) / 2) / 2, abs=1e-6)
    assert torch.equal(per, coupling_hinge(p_r, p_h, harmful, M))


def test_prompt_coupling_with_a_reading_taken_elsewhere():
    v_ref, v_harm = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    h_post = torch.tensor([[[3.0, 4.0], [0.0, -2.0]]])  # p_r = .6, 0
    h_inst = torch.tensor([[[1.0, 1.0], [-1.0, 1.0]]])
    p_harm = torch.tensor([[0.1, -0.3]])
    loss, p_r, p_h = prompt_coupling(h_inst, h_post, v_harm, v_ref, torch.tensor([True, False]), M,
                                     p_harm=p_harm)
    assert torch.equal(p_h, p_harm)
    # harmful: relu(.5-.6) + relu(.5-.1) = .4; retain: relu(0) + relu(-.3) = 0
    assert loss.item() == pytest.approx(0.2, abs=1e-6)


def test_response_coupling_over_several_windows_by_hand():
    # L=1, W=2, B=2: window 1 of row 1 lies past the response (invalid)
    h = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [5.0, 5.0]]]])
    v_ref_resp, v_harm_resp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    valid = torch.tensor([[True, True], [True, False]])
    loss, p_r, p_h = response_coupling(h, v_harm_resp, v_ref_resp, torch.tensor([True, False]), M,
                                       valid=valid)
    torch.testing.assert_close(p_r, torch.tensor([[1.0, 0.0]]))  # window 0's cosines
    # (w0,row0) harmful: relu(.5-1)+relu(.5-0) = .5; (w0,row1) retain: relu(0)+relu(1) = 1;
    # (w1,row0) harmful: relu(.5-0)+relu(.5-1) = .5; (w1,row1) invalid
    assert loss.item() == pytest.approx(2.0 / 3, abs=1e-6)
    one, _, _ = response_coupling(h[:, 0], v_harm_resp, v_ref_resp, torch.tensor([True, False]), M)
    assert one.item() == pytest.approx(0.75, abs=1e-6)


def test_pseudo_refusal_by_hand():
    p_r = torch.tensor([[0.2, -0.05, -0.3, 0.4], [0.0, 0.1, -0.2, -0.5]])
    pseudo = torch.tensor([False, True, True, False])
    # layer 0: relu(-.05+.1) + relu(-.3+.1) = .05 over 2; layer 1: relu(.1+.1) + relu(-.2+.1) = .2
    assert pseudo_refusal(p_r, pseudo, 0.1).item() == pytest.approx((0.025 + 0.1) / 2, abs=1e-6)
    assert pseudo_refusal(p_r, torch.zeros(4, dtype=torch.bool), 0.1).item() == 0.0
    q = p_r.clone().requires_grad_(True)
    pseudo_refusal(q, pseudo, 0.1).backward()
    assert q.grad[:, [0, 3]].abs().sum() == 0  # only pseudo rows are pushed
