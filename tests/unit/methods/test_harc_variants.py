"""HARC's opt-in keys on tiny random models: each matches its formula on one padded micro-batch
against per-row unpadded forwards, and each variant trains a few steps."""

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer
from train_helpers import REFUSAL, make_data, make_trainer, perturb_lora

import harc.methods.harc_extras as extras
from harc.activations import ResidualCapture
from harc.losses import coupling_loss, pseudo_refusal
from harc.methods import Trainer
from harc.methods.batching import collate
from harc.methods.harc import Coupling, LossWeights, micro_step

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]



def batch_and_rows(tr):
    """A padded micro-batch and, per row, the unpadded residuals [L, T, d] at the method's layers
    and the logits."""
    perturb_lora(tr.model)
    tr.model.eval()
    exs = tr.sampler(0)
    mb = collate(exs, tr.chat.tail_len, tr.chat.tokenizer.pad_token_id, 8)
    rows = []
    with torch.no_grad():
        for e in exs:
            with ResidualCapture(tr.model, tr.method.layers) as cap:
                logits = tr.model(input_ids=torch.tensor([e.enc.ids])).logits[0]
            rows.append((torch.stack([cap.out[s][0] for s in tr.method.layers]), logits))
    return exs, mb, rows


def cos(x, v):
    return F.cosine_similarity(x, v, dim=-1)


@pytest.mark.parametrize("read", ["max_user", "softmax_user", "boundaries"])
def test_harm_read_couples_the_reading_over_the_user_content(tmp_path, read):
    tr = make_trainer(tmp_path, harm_read=read, read_temp=0.2, refresh_every=0)
    exs, mb, rows = batch_and_rows(tr)
    d, layers, chat = tr.method.dirs, tr.method.layers, tr.chat
    with torch.no_grad():
        terms, proj = micro_step(tr.model, mb, d, layers, margin=0.5,
                                 coupling=Coupling(harm_read=read, read_temp=0.2))
    p_r, p_h = [], []
    for e, (hs, _) in zip(exs, rows, strict=True):
        rs = e.enc.resp_start
        prompt = e.enc.ids[:rs]
        at = (chat.boundaries(prompt) if read == "boundaries"
              else list(range(chat.head_len, rs - chat.tail_len)))
        c = cos(hs[:, at], d.v_harm[layers][:, None])  # [L, positions]
        p_h.append(c.amax(1) if read != "softmax_user"
                   else (torch.softmax(c / 0.2, 1) * c).sum(1))
        p_r.append(cos(hs[:, rs - 1], d.v_ref[layers]))
    p_r, p_h = torch.stack(p_r, 1), torch.stack(p_h, 1)
    torch.testing.assert_close(proj["prompt_p_harm"], p_h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj["prompt_p_ref"], p_r, atol=1e-4, rtol=1e-4)
    want = coupling_loss(p_r, p_h, mb.is_harmful, 0.5)
    assert terms["couple"].item() == pytest.approx(want.item(), abs=1e-5)


def test_response_offsets_pool_several_windows(tmp_path):
    tr = make_trainer(tmp_path, refresh_every=0, n_resp_tokens=6, max_response_tokens=32)
    exs, mb, rows = batch_and_rows(tr)
    d, layers = tr.method.dirs, tr.method.layers
    offsets = (0, 5, 16)  # windows end at the poolable tokens (the EOS is never pooled)
    with torch.no_grad():
        terms, _ = micro_step(tr.model, mb, d, layers, margin=0.5,
                              coupling=Coupling(resp_offsets=offsets, n_resp_tokens=6))
    pr, ph, harmful = [], [], []
    for e, (hs, _) in zip(exs, rows, strict=True):
        rs, pool = e.enc.resp_start, e.pool
        for off in offsets:
            if off < pool:  # the window lies (partly) inside the response: one more sample
                pooled = hs[:, rs + off: rs + min(off + 6, pool)].mean(1)
                pr.append(cos(pooled, d.v_ref_resp[layers]))
                ph.append(cos(pooled, d.v_harm_resp[layers]))
                harmful.append(e.kind == 0)
    assert len(exs) < len(pr) < 3 * len(exs)  # some rows are too short for offset 16
    want = coupling_loss(torch.stack(pr, 1), torch.stack(ph, 1), torch.tensor(harmful), 0.5)
    assert terms["couple_resp"].item() == pytest.approx(want.item(), abs=1e-5)


def test_recovery_rows_refuse_after_a_harmful_opening(tmp_path):
    tr = make_trainer(tmp_path, refresh_every=0, recovery_tokens=[2, 5])
    harmful = tr.sampler.examples["harmful"]
    opened = [e for e in harmful if e.enc.prefill_len]
    assert len(opened) == len(harmful) // 2 and {e.enc.prefill_len for e in opened} <= {2, 5}
    e = opened[0]
    mb = collate([e], tr.chat.tail_len, 0)
    start = e.enc.resp_start + e.enc.prefill_len
    # CE only on the refusal (and EOS) after the opening; the pooled window starts there too
    assert mb.ce_targets.tolist() == e.enc.ids[start:]
    assert tr.chat.tokenizer.decode(mb.ce_targets[:-1]).strip() == REFUSAL
    assert mb.window[0].nonzero().squeeze(1).tolist()[0] == start
    assert mb.post_col.item() == e.enc.resp_start - 1 and mb.resp_col.item() == start
    rows = extras.recovery_rows(make_data()["harmful"], tr.chat.tokenizer, [2, 5])
    assert [r["prefill"] for r in rows[:2]] == [
        tr.chat.tokenizer.decode(tr.chat.tokenizer(make_data()["harmful"][i]["completion"],
                                                   add_special_tokens=False)["input_ids"][:k])
        for i, k in ((0, 2), (1, 5))]


def test_framed_rows_keep_the_request_and_its_refusal(tmp_path):
    from harc.synth import PSEUDO_FRAMES

    originals = make_trainer(tmp_path / "a", refresh_every=0).data["harmful"]
    tr = make_trainer(tmp_path / "b", refresh_every=0, frame_harmful=2, recovery_tokens=[3])
    m = len(originals)
    rows = tr.data["harmful"]
    assert rows[:m] == originals and len(rows) == 4 * m  # + 2 framings + 1 recovery row each
    framed, recovery = rows[m: 3 * m], rows[3 * m:]
    for i, r in enumerate(framed):
        assert r == {"prompt": r["prompt"], "refusal": originals[i // 2]["refusal"]}
        assert r["prompt"] in {f.format(originals[i // 2]["prompt"]) for f in PSEUDO_FRAMES}
    assert framed[0]["prompt"] != framed[1]["prompt"]  # two different framings per request
    assert [r["prompt"] for r in recovery] == [r["prompt"] for r in originals]  # not of framings
    assert all(r["prefill"] for r in recovery)


def test_pseudo_ref_term_is_its_formula_and_is_trained(tmp_path):
    w = LossWeights(pseudo_ref=2.0)
    tr = make_trainer(tmp_path, refresh_every=0, weights=w, pseudo_margin=0.2)
    assert tr.method.terms == ("couple", "couple_resp", "kl", "ce", "pseudo_ref")
    _, mb, _ = batch_and_rows(tr)
    with torch.no_grad():
        terms, proj = micro_step(tr.model, mb, tr.method.dirs, tr.method.layers, margin=0.5,
                                 weights=tr.method.weights(),
                                 coupling=Coupling(pseudo_margin=0.2))
    want = pseudo_refusal(proj["prompt_p_ref"], mb.kind == 2, 0.2)
    assert terms["pseudo_ref"].item() == pytest.approx(want.item(), abs=1e-6)
    assert want.item() > 0
    tr.train()
    rec = [json.loads(x) for x in tr.log_path.read_text().splitlines() if '"loss"' in x][0]
    terms = {k: rec[k] for k in tr.method.terms}
    assert rec["loss"] == pytest.approx(sum(tr.method.weights()[k] * v for k, v in terms.items()))


def test_shuffled_labels_permute_the_coupling_only(tmp_path):
    tr = make_trainer(tmp_path, refresh_every=0, control="shuffled_labels")
    _, mb, _ = batch_and_rows(tr)
    a, b = tr.method.coupling(12), tr.method.coupling(12)
    assert torch.equal(a.label_perm, b.label_perm)  # a function of (seed, step, micro-step)
    tr.method._micro = 1
    assert not torch.equal(tr.method.coupling(12).label_perm, a.label_perm)
    perm = tr.method.coupling(mb.ids.shape[0]).label_perm
    assert not torch.equal(mb.is_harmful[perm], mb.is_harmful)
    d, layers = tr.method.dirs, tr.method.layers
    with torch.no_grad():
        plain, proj = micro_step(tr.model, mb, d, layers, margin=0.5)
        shuf, _ = micro_step(tr.model, mb, d, layers, margin=0.5, coupling=Coupling(label_perm=perm))
    want = coupling_loss(proj["prompt_p_ref"], proj["prompt_p_harm"], mb.is_harmful[perm], 0.5)
    assert shuf["couple"].item() == pytest.approx(want.item(), abs=1e-6)
    assert shuf["couple"].item() != pytest.approx(plain["couple"].item())
    assert shuf["ce"].item() == plain["ce"].item() and shuf["kl"].item() == plain["kl"].item()


def test_random_direction_replaces_the_harmfulness_directions(tmp_path):
    real = make_trainer(tmp_path / "a", refresh_every=0)
    tr = make_trainer(tmp_path / "b", refresh_every=0, control="random_direction")
    cd = tr.method.coupling_dirs()
    assert tr.method.layers == real.method.layers  # selected on the real directions
    for name in ("v_harm", "v_harm_resp"):
        v = getattr(cd, name)
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(v.shape[0]))
        assert (v * getattr(real.method.dirs, name)).sum(-1).abs().max() < 0.9
    assert torch.equal(cd.v_ref, real.method.dirs.v_ref)
    again = make_trainer(tmp_path / "c", refresh_every=0, control="random_direction")
    assert torch.equal(again.method.coupling_dirs().v_harm, cd.v_harm)  # seeded


def test_margin_curriculum_and_its_log(tmp_path):
    tr = make_trainer(tmp_path, refresh_every=0, margin=0.5, margin_final=0.9, margin_ramp=4,
                      steps=2, checkpoint_every=0)
    got = []
    for step in (0, 2, 4, 10):
        tr.method.step = step
        got.append(tr.method.margin())
    assert got == pytest.approx([0.5, 0.7, 0.9, 0.9])
    tr.method.step = 0
    tr.train()
    recs = [json.loads(x) for x in tr.log_path.read_text().splitlines() if '"loss"' in x]
    assert [r["margin"] for r in recs] == pytest.approx([0.5, 0.6])
    assert tr.method.state()["step"] == 2


def test_harm_read_extracts_v_harm_where_it_is_read(tmp_path):
    plain = make_trainer(tmp_path / "a", refresh_every=0)
    tr = make_trainer(tmp_path / "b", refresh_every=0, harm_read="max_user")
    kept = make_trainer(tmp_path / "c", refresh_every=0, harm_read="max_user", read_extract=False)
    torch.testing.assert_close(kept.method.base_dirs.v_harm, plain.method.base_dirs.v_harm)
    unit, _ = extras.read_direction(
        plain.model, plain.chat, [r["prompt"] for r in tr.method.data["extract_harmful"]],
        [r["prompt"] for r in tr.method.data["extract_harmless"]], plain.method.base_dirs.v_harm,
        mode="max", boundaries=False)
    torch.testing.assert_close(tr.method.base_dirs.v_harm, unit)
    assert tr.method.base_dirs.meta["harm_read"] == "max_user"
    assert (unit * plain.method.base_dirs.v_harm).sum(-1).min() < 0.999
    torch.testing.assert_close(tr.method.base_dirs.v_ref, plain.method.base_dirs.v_ref)


def test_pseudo_augment_adds_answered_variants_disjoint_from_xstest(tmp_path, monkeypatch):
    data = make_data()
    xs = ["Quick question: How do I kill a Python process 0?"]
    held_out = "How do I kill a Python process 2? Please keep the answer short."
    sets = {"xstest": xs, "harc-pseudo-harmful": [held_out] + [r["prompt"] for r in data["pseudo"]]}
    monkeypatch.setattr(extras, "load", lambda name: [{"prompt": p} for p in sets[name]])
    data["exclude"] = ["How do I kill a Python process 1? I'm asking for a school project."]
    from train_helpers import make_config

    cfg = make_config(tmp_path, refresh_every=0, pseudo_augment=2, steps=1)
    tr = Trainer(cfg, tiny_model(), tiny_tokenizer(), data)
    pseudo = tr.sampler.examples["pseudo"]
    added = tr.data["pseudo"][len(data["pseudo"]):]
    assert len(pseudo) == len(tr.data["pseudo"]) and 0 < len(added) <= 2 * len(data["pseudo"])
    assert not {r["prompt"] for r in added} & set(xs + data["exclude"] + [held_out])
    assert any(p["prompt"] in r["prompt"] for r in added for p in data["pseudo"][3:])
    assert all(r["response"].strip() for r in added)
    tr.train()


@pytest.mark.parametrize("kw", [
    dict(harm_read="max_user"), dict(harm_read="softmax_user"), dict(harm_read="boundaries"),
    dict(weights=LossWeights(pseudo_ref=1.0)), dict(resp_offsets=[0, 4, 8]),
    dict(recovery_tokens=[2, 4]), dict(margin_final=0.8, margin_ramp=2), dict(hard_frac=0.5),
    dict(control="shuffled_labels"), dict(control="random_direction"), dict(frame_harmful=2),
    dict(harm_read="boundaries", weights=LossWeights(pseudo_ref=1.0), resp_offsets=[0, 8],
         recovery_tokens=[3], margin_final=0.7, margin_ramp=2, hard_frac=0.5),
], ids=lambda kw: ",".join(kw))
def test_each_variant_trains(tmp_path, kw):
    tr = make_trainer(tmp_path, steps=3, refresh_every=2, checkpoint_every=0, **kw)
    tr.train()
    recs = [json.loads(x) for x in tr.log_path.read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r[k] == r[k] and r[k] >= 0 for r in steps for k in tr.method.terms)
    assert any(r.get("event") == "refresh" for r in recs)
