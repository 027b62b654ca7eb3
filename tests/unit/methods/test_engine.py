"""The HARC trainer on tiny random models: positions, one-forward losses, checkpointing, resume."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer
from train_helpers import adapter_state, make_config, make_data, make_trainer, perturb_lora, write_data

from harc.activations import ResidualCapture
from harc.cli import main as harc_main
from harc.errors import HarcError
from harc.lora import load_adapter
from harc.losses import coupling_loss
from harc.methods import Trainer as HarcTrainer
from harc.methods.batching import collate
from harc.methods.config import BatchSizes, DataSettings
from harc.methods.harc import micro_step
from harc.models import decoder_layers

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]



def test_collate_positions(tmp_path):
    tr = make_trainer(tmp_path)
    exs = tr.sampler(0)
    mb = collate(exs, tr.chat.tail_len, tr.chat.tokenizer.pad_token_id, multiple=16)
    assert [int(k) for k in mb.kind] == [0, 0, 0, 1, 1, 2]
    assert mb.ids.shape[1] % 16 == 0 and mb.n_real == sum(e.length for e in exs)
    T = mb.ids.shape[1]
    for i, e in enumerate(exs):
        prompt = e.enc.ids[: e.enc.resp_start]
        assert mb.ids[i, mb.post_col[i]].item() == prompt[-1]
        assert mb.ids[i, mb.inst_col[i]].item() == prompt[tr.chat.t_inst]
        assert mb.window[i].sum().item() == e.window
        assert mb.window[i, T - e.length + e.enc.resp_start].item() == 1.0
    ce_rows = mb.ce_rows.tolist()
    assert set(ce_rows) == {0, 1, 2}
    # targets are the refusal tokens, EOS last, predicted from the previous position
    row0 = [t for r, t in zip(ce_rows, mb.ce_targets.tolist(), strict=True) if r == 0]
    assert row0 == exs[0].enc.ids[exs[0].enc.resp_start:]
    assert row0[-1] == tr.chat.tokenizer.eos_token_id
    assert torch.equal(mb.ids[mb.ce_rows, mb.ce_cols + 1], mb.ce_targets)
    assert set(mb.kl_rows.tolist()) == {3, 4, 5}
    assert mb.retain_rows.tolist() == [3, 4, 5]


@pytest.mark.parametrize("arch,template", [("llama", "chatml"), ("qwen2", "qwen2.5")])
def test_one_forward_matches_separate_unpadded_forwards(tmp_path, arch, template):
    """Coupling, KL and CE from one padded forward equal per-row, unpadded, full-logit values."""
    tr = make_trainer(tmp_path, arch=arch, template=template)
    model = tr.model
    perturb_lora(model)
    model.eval()
    exs = tr.sampler(0)
    mb = collate(exs, tr.chat.tail_len, tr.chat.tokenizer.pad_token_id, multiple=8)
    layers, d = tr.method.layers, tr.method.dirs
    with torch.no_grad():
        terms, proj = micro_step(model, mb, d, layers, margin=0.5, chunk=5)
        p_r, p_h, r_r, r_h, ce_sum, kl_sum, n_ce, n_kl = [], [], [], [], 0.0, 0.0, 0, 0
        for e in exs:
            ids = torch.tensor([e.enc.ids])
            with ResidualCapture(model, layers) as cap:
                logits = model(input_ids=ids).logits[0]
            hs = torch.stack([cap.out[s][0] for s in layers])  # [L, T, d]
            rs = e.enc.resp_start
            t_post, t_inst = rs - 1, rs - 1 - tr.chat.tail_len
            p_r.append(F.cosine_similarity(hs[:, t_post], d.v_ref[layers], dim=-1))
            p_h.append(F.cosine_similarity(hs[:, t_inst], d.v_harm[layers], dim=-1))
            pooled = hs[:, rs: rs + e.window].mean(1)
            r_r.append(F.cosine_similarity(pooled, d.v_ref_resp[layers], dim=-1))
            r_h.append(F.cosine_similarity(pooled, d.v_harm_resp[layers], dim=-1))
            pred = logits[rs - 1: len(e.enc.ids) - 1]
            if e.kind == 0:
                ce_sum += F.cross_entropy(pred, ids[0, rs:], reduction="sum").item()
                n_ce += len(pred)
            else:
                with model.disable_adapter():
                    base = model(input_ids=ids).logits[0, rs - 1: len(e.enc.ids) - 1]
                kl_sum += F.kl_div(pred.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                   reduction="sum").item()
                n_kl += len(pred)
    tol = dict(atol=1e-4, rtol=1e-4)
    p_r, p_h, r_r, r_h = (torch.stack(x, 1) for x in (p_r, p_h, r_r, r_h))
    torch.testing.assert_close(proj["prompt_p_ref"], p_r, **tol)
    torch.testing.assert_close(proj["prompt_p_harm"], p_h, **tol)
    torch.testing.assert_close(proj["resp_p_ref"], r_r, **tol)
    torch.testing.assert_close(proj["resp_p_harm"], r_h, **tol)
    harmful = mb.is_harmful
    assert terms["couple"].item() == pytest.approx(coupling_loss(p_r, p_h, harmful, 0.5).item(),
                                                   abs=1e-5)
    assert terms["couple_resp"].item() == pytest.approx(
        coupling_loss(r_r, r_h, harmful, 0.5).item(), abs=1e-5)
    assert terms["ce"].item() == pytest.approx(ce_sum / n_ce, rel=1e-4)
    assert kl_sum > 0 and terms["kl"].item() == pytest.approx(kl_sum / n_kl, rel=1e-3, abs=1e-6)


def test_kl_is_zero_for_a_fresh_adapter(tmp_path):
    tr = make_trainer(tmp_path)
    mb = collate(tr.sampler(0), tr.chat.tail_len, 0)
    with torch.no_grad():
        terms, _ = micro_step(tr.model, mb, tr.method.dirs, tr.method.layers, margin=0.5)
    assert abs(terms["kl"].item()) < 1e-6  # LoRA B starts at 0: adapted == base


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads, calls = [], []
    for ckpt in (False, True):
        tr = make_trainer(tmp_path / str(ckpt), gradient_checkpointing=ckpt)
        perturb_lora(tr.model)
        tr.model.train()
        n = []
        attn = decoder_layers(tr.model)[0].self_attn
        h = attn.register_forward_hook(lambda *_, n=n: n.append(1))
        mb = collate(tr.sampler(0), tr.chat.tail_len, 0)
        micro_step(tr.model, mb, tr.method.dirs, tr.method.layers, margin=0.5, backward_scale=1.0)
        h.remove()
        grads.append({k: p.grad.clone() for k, p in tr.model.named_parameters() if p.requires_grad})
        calls.append(len(n))
    assert calls[1] > calls[0]  # the checkpointed run recomputed blocks in backward
    assert all(g.abs().sum() > 0 for g in grads[1].values() if g is not None)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)


def test_length_bucketing_keeps_composition_and_is_deterministic(tmp_path):
    tr = make_trainer(tmp_path)
    for idx in range(6):
        kinds = [e.kind for e in tr.sampler(idx)]
        assert kinds == [0, 0, 0, 1, 1, 2]
    a, b = tr.sampler(0), tr.sampler(1)  # one window of 2
    assert max(e.length for e in a if e.kind == 0) <= min(e.length for e in b if e.kind == 0)
    other = make_trainer(tmp_path / "2")
    assert [e.enc.ids for e in other.sampler(5)] == \
           [e.enc.ids for e in tr.sampler(5)]
    # one epoch of harmful rows visits every training example once
    n = len(tr.sampler.examples["harmful"])
    seen = [tr.sampler._perm(0, 0)[i] for i in range(n)]
    assert sorted(seen) == list(range(n))


def test_no_pseudo_category(tmp_path):
    data = make_data()
    del data["pseudo"]
    cfg = make_config(tmp_path, batch=BatchSizes(harmful=2, harmless=2, pseudo=0), steps=1, refresh_every=0,
                      data=DataSettings(harmful="h", harmless="b", extract_n=6, val_n=3))
    tr = HarcTrainer(cfg, tiny_model(), tiny_tokenizer(), data)
    tr.train()
    rec = [json.loads(x) for x in tr.log_path.read_text().splitlines()][1]
    assert rec["step"] == 1 and all(rec[k] == rec[k] for k in ("kl", "ce", "couple"))


def test_refresh_blends_against_base_and_ramp(tmp_path):
    tr = make_trainer(tmp_path, k_start=1, k_final=2, ramp_step=1, refresh_every=0, steps=1,
                      checkpoint_every=0)
    assert len(tr.method.layers) == 1
    fresh = tr.method.base_dirs.blend(tr.method.base_dirs, 0.0)
    fresh.v_ref = F.normalize(fresh.v_ref + 0.5 * torch.randn_like(fresh.v_ref), dim=-1)
    tr.method.extract = lambda: fresh
    tr.step = 1
    rec1 = tr.method.refresh(tr.step)
    rec2 = tr.method.refresh(tr.step)  # blending again must not compound: always against the base
    want = tr.method.base_dirs.blend(fresh, 0.3)
    torch.testing.assert_close(tr.method.dirs.v_ref, want.v_ref)
    assert len(tr.method.layers) == 2 and rec2["layers"] == tr.method.layers
    assert rec1["drift_fresh_vs_base"]["v_ref"] < 0.999
    assert set(rec1["heldout"]) >= {"harmful", "harmless", "gap_harm", "gap_ref"}
    assert "mean" in rec1["cos_ref_harm_boot"]


def test_exact_resume_after_a_kill(tmp_path):
    full = make_trainer(tmp_path / "a")
    full.train()
    want = adapter_state(full.model)

    killed = make_trainer(tmp_path / "b")
    calls, orig = [0], killed.method.micro_step

    def dying(mb, scale):
        calls[0] += 1
        if calls[0] == 6:  # step 3, second micro-batch: gradients half accumulated
            raise KeyboardInterrupt
        return orig(mb, scale)

    killed.method.micro_step = dying
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert killed.latest_checkpoint().name == "step-0000002"

    resumed = make_trainer(tmp_path / "b")  # a new process would build everything afresh
    resumed.train()
    got = adapter_state(resumed.model)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(resumed.method.dirs.v_ref, full.method.dirs.v_ref)
    assert resumed.method.layers == full.method.layers
    steps = [json.loads(x).get("step") for x in resumed.log_path.read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4]
    loaded = load_adapter(tiny_model(), resumed.out / "adapter")
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(lora) == len(want)


def poison(tr, bad_calls):
    """Make the micro-steps numbered in `bad_calls` (1-based) report a NaN KL."""
    calls, orig = [0], tr.method.micro_step

    def poisoned(mb, scale):
        calls[0] += 1
        terms, proj = orig(mb, scale)
        if calls[0] in bad_calls:
            terms["kl"] = torch.tensor(float("nan"))
        return terms, proj

    tr.method.micro_step = poisoned


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    tr = make_trainer(tmp_path, skip_nonfinite=0)
    poison(tr, range(5, 100))
    with pytest.raises(HarcError, match=r"non-finite kl at step 3.*step-0000002"):
        tr.train()
    ckpt = tr.latest_checkpoint()
    assert ckpt.name == "step-0000002"
    fresh = make_trainer(tmp_path / "x")
    fresh.load_checkpoint(ckpt)
    state = adapter_state(tr.model)  # the bad step was not applied
    for k, v in adapter_state(fresh.model).items():
        torch.testing.assert_close(state[k], v)
    last = json.loads(tr.log_path.read_text().splitlines()[-1])
    assert last["event"] == "nonfinite" and last["terms"] == ["kl"]


def test_isolated_nonfinite_step_is_dropped_and_training_goes_on(tmp_path):
    tr = make_trainer(tmp_path, steps=4, refresh_every=0, skip_nonfinite=1)
    poison(tr, {5})  # micro-step 5 = the first half of optimizer step 3
    tr.train()
    assert tr.step == 4 and tr.skipped == 1
    # Adam counted 3 applied updates, not 4: the poisoned step changed nothing.
    assert {int(s["step"]) for s in tr.optimizer.state.values()} == {3}
    rows = [json.loads(x) for x in tr.log_path.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4]
    bad = [r for r in rows if r.get("event") == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 3 and not bad[0]["stopped"]
    state = json.loads((tr.latest_checkpoint() / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["skipped"] == 1  # a resumed run keeps the count


def test_nonfinite_steps_beyond_the_allowance_stop_the_run(tmp_path):
    tr = make_trainer(tmp_path, steps=4, refresh_every=0, skip_nonfinite=1)
    poison(tr, {3, 7})  # optimizer steps 2 and 4
    with pytest.raises(HarcError, match=r"non-finite kl at step 4 \(non-finite step 2"):
        tr.train()
    assert tr.skipped == 2


def test_resume_refuses_changed_config(tmp_path):
    tr = make_trainer(tmp_path, steps=2, refresh_every=0)
    tr.train()
    other = make_trainer(tmp_path, steps=3, refresh_every=0, lr=5e-4)
    with pytest.raises(HarcError, match="lr"):
        other.train()


def test_train_command_end_to_end(tmp_path, monkeypatch):
    import harc.models

    paths = write_data(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: tiny\ndata:\n  harmful: {paths['harmful']}\n  harmless: {paths['harmless']}\n"
        f"  pseudo: {paths['pseudo']}\n  extract_n: 6\n  val_n: 3\nlr: 1e-3\nsteps: 2\n"
        "warmup_steps: 1\nband: [1, 1]\nrefresh_every: 0\nn_boot: 0\nmax_prompt_tokens: 64\n"
        "max_response_tokens: 32\nbatch: {harmful: 2, harmless: 1, pseudo: 1}\n")
    monkeypatch.setattr(harc.models, "load_model",
                        lambda *a, **k: (tiny_model(), tiny_tokenizer()))
    harc_main(["train", "--config", str(cfg), f"output_dir={tmp_path / 'run'}", "lora.r=2"])
    out = tmp_path / "run" / "adapter"
    assert (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "harc_adapter.json").read_text())
    assert meta["config"]["lora"]["r"] == 2 and meta["n_layers"] == 4
    assert (tmp_path / "run" / "directions.safetensors").is_file()


def test_train_command_validates_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import harc.models

    def boom(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(harc.models, "load_model", boom)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    for args, key in ((["data.harmful=/nonexistent.jsonl", "margin=2"], "margin"),
                      (["data.harmful=/nonexistent.jsonl", "data.harmless=x.jsonl",
                        "batch.pseudo=0"], "data.harmful")):
        with pytest.raises(SystemExit) as e:
            harc_main(["train", "--config", str(cfg), *args])
        assert e.value.code != 0
        assert key in capsys.readouterr().err


def test_bench_runs_on_cpu():
    path = Path(__file__).resolve().parents[3] / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("bench_train_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rep = mod.main(["--arch", "tiny", "--n", "1", "--warmup", "0", "--lens", "24-40",
                    "--device", "cpu", "--kl-cache", "1"])
    assert [(r["gradient_checkpointing"], r["kl_cache_hits"]) for r in rep["runs"]] == [
        (False, None), (False, 1.0), (True, None), (True, 1.0)]
    assert all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in rep["runs"])


def test_directions_from_another_template_are_refused(tmp_path):
    tr = make_trainer(tmp_path, refresh_every=0)
    cfg = make_config(tmp_path, refresh_every=0, raw_template="qwen")
    with pytest.raises(HarcError, match="another chat template"):
        HarcTrainer(cfg, tiny_model(), tiny_tokenizer(), make_data(), directions=tr.method.base_dirs)


def test_compile_wraps_every_block_while_training_only(tmp_path, monkeypatch):
    wrapped, calls = [], []

    def fake_compile(fn, **kw):
        wrapped.append(kw)

        def run(*a, **k):
            calls.append(1)
            return fn(*a, **k)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    tr = make_trainer(tmp_path, compile=True, steps=1, refresh_every=0)
    blocks = decoder_layers(tr.model)
    tr.train()
    assert len(wrapped) == len(blocks) and all(kw == {"dynamic": True} for kw in wrapped)
    assert len(calls) >= 2 * len(blocks)  # adapted forward of both micro-batches went through it
    assert not any("forward" in vars(b) for b in blocks)  # restored after training
