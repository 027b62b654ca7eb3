"""The baseline methods (sft, dpo, circuit_breakers): each loss against its formula on fixed
inputs, each micro-step against unpadded per-row forwards, rejected rows in the micro-batch, and
training with resume."""

import ast
import importlib.util
import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer
from train_helpers import make_config, make_data, perturb_lora

from harc.activations import ResidualCapture
from harc.errors import HarcError
from harc.methods import Trainer, config_from_raw
from harc.methods.batching import REJECTED, collate
from harc.methods.circuit_breakers import (
    coefficients,
    default_layers,
    rerouting_loss,
    retain_loss,
)
from harc.methods.circuit_breakers import micro_step as cb_step
from harc.methods.dpo import dpo_loss, sequence_logps
from harc.methods.dpo import micro_step as dpo_step
from harc.methods.harc import micro_step as harc_step
from harc.methods.sft import micro_step as sft_step

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]



def _cfg(tmp_path, method, **kw):
    raw = {"method": method, "data": {"extract_n": 6, "val_n": 3}, "lora": {"r": 4, "alpha": 8},
           "batch": {"harmful": 3, "harmless": 2, "pseudo": 1}, "grad_accum": 2, "steps": 4,
           "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2, "max_prompt_tokens": 64,
           "max_response_tokens": 32, "output_dir": str(tmp_path / method), **kw}
    return config_from_raw(raw, require_data=False)


def _trainer(tmp_path, method, **kw):
    return Trainer(_cfg(tmp_path, method, **kw), tiny_model("llama"), tiny_tokenizer("chatml"),
                   make_data())


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- sft -----------------------------------------------------------------------------------------
def test_sft_equals_harc_with_zero_coupling_weights(tmp_path):
    harc = Trainer(make_config(tmp_path, weights={"couple": 0.0, "couple_resp": 0.0}),
                   tiny_model("llama"), tiny_tokenizer("chatml"), make_data())
    sft = _trainer(tmp_path, "sft")
    for tr in (harc, sft):
        perturb_lora(tr.model)  # KL and the coupling gradients are non-zero
    mb = collate(harc.sampler(0), harc.chat.tail_len, 0, 8)
    w = harc.method.weights()
    t_h, _ = harc_step(harc.model, mb, harc.method.dirs, harc.method.layers, margin=0.5,
                       weights=w, backward_scale=0.5)
    t_s, _ = sft_step(sft.model, mb, weights=sft.method.weights(), backward_scale=0.5)
    assert t_h["couple"] > 0 and t_h["kl"] > 0  # the coupling is live, only weighted 0
    assert t_s["ce"] == t_h["ce"] and t_s["kl"] == t_h["kl"]
    g_h, g_s = _grads(harc.model), _grads(sft.model)
    assert g_h.keys() == g_s.keys() and g_h
    for n in g_h:
        torch.testing.assert_close(g_s[n], g_h[n], rtol=1e-6, atol=1e-9)


def test_sft_config_refuses_harc_keys():
    with pytest.raises(HarcError, match="'margin' belongs to method harc"):
        config_from_raw({"method": "sft", "margin": 0.5}, require_data=False)
    with pytest.raises(HarcError, match="weights.couple"):
        config_from_raw({"method": "sft", "weights": {"couple": 1.0}}, require_data=False)


# ---- dpo -----------------------------------------------------------------------------------------
def test_dpo_loss_formula_on_fixed_numbers():
    pc, pr = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    rc, rr = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    z = [0.5 * ((-3 + 4) - (-5 + 4.5)), 0.5 * ((-10 + 9) - (-4 + 6))]  # 0.75, -1.5
    want = sum(-math.log(1 / (1 + math.exp(-x))) for x in z) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert margin.item() == pytest.approx(sum(z) / 2)
    zero, _ = dpo_loss(*(torch.zeros(0),) * 4, beta=0.1)
    assert zero.item() == 0.0


def _trl_compute_loss():
    """trl's own DPO loss code (`DPOTrainer._compute_loss`), compiled alone: importing the trainer
    needs datasets, pyarrow and pandas, none of which the loss uses."""
    spec = importlib.util.find_spec("trl")
    if spec is None:
        pytest.skip("trl is not installed (pip install 'harc[trl]')")
    src = Path(spec.origin).parent / "trainer" / "dpo_trainer.py"
    tree = ast.parse(src.read_text())
    fn = [n for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "DPOTrainer"
          for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_loss"]
    if not fn:
        pytest.skip("this trl version has no DPOTrainer._compute_loss")
    ns = {"torch": torch, "F": F, "math": math}
    exec(compile(ast.Module(fn, []), str(src), "exec"), ns)
    return ns["_compute_loss"]


def test_dpo_loss_and_sequence_logps_match_trl():
    trl_loss = _trl_compute_loss()
    g = torch.Generator().manual_seed(0)
    P, T, V, beta = 3, 9, 13, 0.1
    ids = torch.randint(0, V, (2 * P, T), generator=g)
    completion = torch.zeros(2 * P, T, dtype=torch.long)
    for b in range(2 * P):
        completion[b, 2 + b % 4:] = 1
    logits = torch.randn(2 * P, T, V, generator=g)
    ref_c, ref_r = torch.randn(P, generator=g) - 9, torch.randn(P, generator=g) - 9
    per_token = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
    per_token = per_token * completion[:, 1:]

    def model(**_):
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x,
                                          gather=lambda x: x),
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    want = trl_loss(trainer, model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                     "completion_mask": completion, "ref_chosen_logps": ref_c,
                                     "ref_rejected_logps": ref_r}, False)
    # harc's positions: column c predicts token c + 1 (the micro-batch's ce/rej columns)
    rows, cols = (completion[:, 1:] == 1).nonzero(as_tuple=True)
    seq = sequence_logps(lambda h: h, logits, rows, cols, ids[rows, cols + 1], 2 * P, chunk=4)
    got, _ = dpo_loss(seq[:P], seq[P:], ref_c, ref_r, beta)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


def test_rejected_rows_are_appended_and_paired(tmp_path):
    tr = _trainer(tmp_path, "dpo")
    exs = tr.sampler(0)
    mb = collate(exs, tr.chat.tail_len, 0, 8)
    n = len(exs)
    assert [int(k) for k in mb.kind] == [0, 0, 0, 1, 1, 2] + [REJECTED] * 3
    assert mb.pairs.tolist() == [[0, n], [1, n + 1], [2, n + 2]]
    assert mb.retain_rows.tolist() == [3, 4, 5] and mb.is_harmful.tolist()[n:] == [False] * 3
    assert set(mb.ce_rows.tolist()) == {0, 1, 2} and set(mb.rej_rows.tolist()) == {n, n + 1, n + 2}
    tok = tr.chat.tokenizer
    for j, e in enumerate(exs[:3]):
        rej = [t for r, t in zip(mb.rej_rows.tolist(), mb.rej_targets.tolist()) if r == n + j]
        chosen = [t for r, t in zip(mb.ce_rows.tolist(), mb.ce_targets.tolist()) if r == j]
        assert tok.decode(rej).startswith("Sure, here is how")  # the harmful completion
        assert tok.decode(chosen).startswith("I'm sorry")  # the refusal
        assert rej[-1] == chosen[-1] == tok.eos_token_id
        assert e.rejected.enc.ids[: e.rejected.enc.resp_start] == e.enc.ids[: e.enc.resp_start]
    assert torch.equal(mb.ids[mb.rej_rows, mb.rej_cols + 1], mb.rej_targets)


def test_dpo_micro_step_matches_unpadded_per_row_forwards(tmp_path):
    tr = _trainer(tmp_path, "dpo")
    model = tr.model
    perturb_lora(model)
    model.eval()
    exs = tr.sampler(0)
    mb = collate(exs, tr.chat.tail_len, 0, 8)

    def seq_logp(enc):
        ids = torch.tensor([enc.ids])
        rs = enc.resp_start
        lp = model(input_ids=ids).logits[0, rs - 1: len(enc.ids) - 1].log_softmax(-1)
        return lp.gather(1, ids[0, rs:, None]).sum().item()

    with torch.no_grad():
        terms, _ = dpo_step(model, mb, beta=0.2, weights={"dpo": 1.0, "kl": 10.0}, chunk=5)
        want = []
        for e in exs[:3]:
            pi = (seq_logp(e.enc), seq_logp(e.rejected.enc))
            with model.disable_adapter():
                ref = (seq_logp(e.enc), seq_logp(e.rejected.enc))
            z = 0.2 * ((pi[0] - ref[0]) - (pi[1] - ref[1]))
            want.append(-math.log(1 / (1 + math.exp(-z))))
    assert terms["dpo"].item() == pytest.approx(sum(want) / 3, rel=1e-4)
    assert terms["kl"].item() > 0


# ---- circuit breakers ------------------------------------------------------------------------
def test_rerouting_and_retain_losses_on_fixed_tensors():
    g = torch.Generator().manual_seed(3)
    L, N, T, d = 2, 3, 4, 5
    h, h0 = torch.randn(L, N, T, d, generator=g), torch.randn(L, N, T, d, generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    cos, dist, count = 0.0, 0.0, 0
    for layer in range(L):
        for n in range(N):
            for t in range(T):
                if mask[n, t]:
                    a, b = h[layer, n, t], h0[layer, n, t]
                    cos += max(0.0, (a @ b / (a.norm() * b.norm())).item())
                    dist += (a - b).norm().item()
                    count += 1
    assert rerouting_loss(h, h0, mask).item() == pytest.approx(cos / count, rel=1e-5)
    assert retain_loss(h, h0, mask).item() == pytest.approx(dist / count, rel=1e-5)
    assert rerouting_loss(h, -h, mask).item() == 0.0  # rerouted: cos <= 0 costs nothing
    assert retain_loss(h, h, mask).item() == 0.0


def test_coefficient_schedule_and_default_layers():
    assert coefficients(0, 100, 10.0) == {"reroute": 10.0, "retain": 0.0}
    assert coefficients(50, 100, 10.0) == {"reroute": 7.5, "retain": 2.5}
    assert coefficients(100, 100, 4.0) == {"reroute": 2.0, "retain": 2.0}
    assert default_layers(32) == [10, 20]  # the paper's Llama-3-8B layers
    assert default_layers(24) == [8, 15] and default_layers(30) == [9, 19]
    assert default_layers(2) == [1]


def test_cb_micro_step_matches_full_forwards_and_gradients(tmp_path):
    tr = _trainer(tmp_path, "circuit_breakers", layers=[1, 3])
    model = tr.model
    perturb_lora(model)
    mb = collate(tr.sampler(0), tr.chat.tail_len, 0, 8)
    coeffs = {"reroute": 2.0, "retain": 0.5}
    terms, _ = cb_step(model, mb, [3, 1], coeffs=coeffs, backward_scale=1.0)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    # Reference: full forwards (no early stop), every row unpadded, the formula by hand.
    rr, rt, n_rr, n_rt = 0.0, 0.0, 0, 0
    for i in range(mb.ids.shape[0]):
        keep = mb.mask[i] == 1
        ids = mb.ids[i, keep][None]
        with ResidualCapture(model, [1, 3], detach=False) as cap:
            model(input_ids=ids)
        h = torch.stack([cap.out[s][0] for s in (1, 3)])
        with torch.no_grad(), model.disable_adapter(), ResidualCapture(model, [1, 3]) as cap0:
            model(input_ids=ids)
        h0 = torch.stack([cap0.out[s][0] for s in (1, 3)])
        if mb.is_harmful[i]:
            rr = rr + F.relu(F.cosine_similarity(h, h0, dim=-1)).sum()
            n_rr += h.shape[0] * h.shape[1]
        else:
            rt = rt + (h - h0).norm(dim=-1).sum()
            n_rt += h.shape[0] * h.shape[1]
    rr, rt = rr / n_rr, rt / n_rt
    assert terms["reroute"].item() == pytest.approx(rr.item(), rel=1e-4)
    assert terms["retain"].item() == pytest.approx(rt.item(), rel=1e-4)
    (2.0 * rr + 0.5 * rt).backward()
    want = _grads(model)
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-6)


def test_cb_layers_must_fit_the_model(tmp_path):
    with pytest.raises(HarcError, match="'layers': slots must lie in 0..4"):
        _trainer(tmp_path, "circuit_breakers", layers=[2, 9])
    with pytest.raises(HarcError, match="cb_alpha"):
        _cfg(tmp_path, "circuit_breakers", cb_alpha=0)


# ---- training --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sft", "dpo", "circuit_breakers"])
def test_baselines_train_and_resume_exactly_after_a_kill(tmp_path, method):
    full = _trainer(tmp_path / "a", method)
    full.train()
    killed = _trainer(tmp_path / "b", method)
    calls, orig = [0], killed.method.micro_step

    def dying(mb, scale):
        calls[0] += 1
        if calls[0] == 6:  # step 3, second micro-batch
            raise KeyboardInterrupt
        return orig(mb, scale)

    killed.method.micro_step = dying
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = _trainer(tmp_path / "b", method)
    resumed.train()
    for a, b in zip(_params(full.model), _params(resumed.model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    logs = [[json.loads(x) for x in tr.log_path.read_text().splitlines()] for tr in (full, resumed)]
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[1]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    meta = json.loads((resumed.out / "adapter" / "harc_adapter.json").read_text())
    assert meta["method"] == method and meta["step"] == 4
    if method == "circuit_breakers":
        assert [r["coeffs"]["reroute"] for r in logs[1] if "loss" in r] == [10.0, 8.75, 7.5, 6.25]


def _params(model):
    return [p.detach() for p in model.parameters() if p.requires_grad]
