import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer

import harc.directions as D
from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.layers import band_mask, layer_scores, ramp_k, select_layers

pytestmark = pytest.mark.unit


def _fixed_acts(monkeypatch, n_slots=6, d=5):
    """Replace the model passes by fixed synthetic activations keyed by the prompt text."""
    g = torch.Generator().manual_seed(0)
    table = {}

    def vec(key):
        if key not in table:
            table[key] = torch.randn(n_slots, d, generator=g)
        return table[key]

    def prompt_acts(model, chat, prompts, batch_size=16, progress=None, slots=None):
        for i in range(0, len(prompts), batch_size):
            b = prompts[i:i + batch_size]
            yield {"inst": torch.stack([vec(("i", p)) for p in b]),
                   "post": torch.stack([vec(("p", p)) for p in b])}

    def resp_acts(model, chat, pairs, n_tokens=32, batch_size=16, progress=None, slots=None):
        for i in range(0, len(pairs), batch_size):
            yield torch.stack([vec(("r",) + tuple(p)) for p in pairs[i:i + batch_size]])

    monkeypatch.setattr(D, "iter_prompt_acts", prompt_acts)
    monkeypatch.setattr(D, "iter_response_acts", resp_acts)
    monkeypatch.setattr(D, "model_identity", lambda m: {"model": "fixed", "n_layers": n_slots - 1,
                                                         "hidden_size": d})
    return vec


class _Chat:
    t_inst, t_post, raw_template, system_prompt = -3, -1, None, None

    def template_hash(self):
        return "x"


def test_directions_match_the_formulas(monkeypatch):
    vec = _fixed_acts(monkeypatch)
    H = [f"harm{i}" for i in range(7)]
    B = [f"safe{i}" for i in range(5)]
    comp = [(h, "sure") for h in H]
    ref = [(h, "sorry") for h in H]
    helpf = [(b, "answer") for b in B]
    d = D.extract_directions(None, _Chat(), harmful=H, harmless=B, harmful_completions=comp,
                             refusals=ref, helpful=helpf, batch_size=3, n_boot=0)
    mean = lambda keys: torch.stack([vec(k) for k in keys]).mean(0)  # noqa: E731
    raw_harm = mean([("i", p) for p in H]) - mean([("i", p) for p in B])
    raw_ref = mean([("p", p) for p in H]) - mean([("p", p) for p in B])
    raw_hr = mean([("r",) + p for p in comp]) - mean([("r",) + p for p in helpf])
    raw_rr = mean([("r",) + p for p in ref]) - mean([("r",) + p for p in helpf])
    for got, raw, name in [(d.v_harm, raw_harm, "v_harm"), (d.v_ref, raw_ref, "v_ref"),
                           (d.v_harm_resp, raw_hr, "v_harm_resp"), (d.v_ref_resp, raw_rr, "v_ref_resp")]:
        torch.testing.assert_close(got, F.normalize(raw, dim=-1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(d.norms[name], raw.norm(dim=-1), atol=1e-6, rtol=1e-5)


def test_bootstrap_cos_matches_resampled_formula(monkeypatch):
    vec = _fixed_acts(monkeypatch)
    H, B = [f"h{i}" for i in range(6)], [f"b{i}" for i in range(4)]
    d = D.extract_directions(None, _Chat(), harmful=H, harmless=B,
                             harmful_completions=[(H[0], "x")], refusals=[(H[0], "y")],
                             helpful=[(B[0], "z")], batch_size=16, n_boot=5, seed=11)
    def wmean(keys, w):
        x = torch.stack([vec(k) for k in keys]).double()
        return torch.einsum("kb,bsd->ksd", w, x) / w.sum(1).view(-1, 1, 1)
    wh = torch.poisson(torch.ones(5, 6, dtype=torch.float64), generator=torch.Generator().manual_seed(11))
    wb = torch.poisson(torch.ones(5, 4, dtype=torch.float64), generator=torch.Generator().manual_seed(12))
    vh = F.normalize(wmean([("i", p) for p in H], wh) - wmean([("i", p) for p in B], wb), dim=-1)
    vr = F.normalize(wmean([("p", p) for p in H], wh) - wmean([("p", p) for p in B], wb), dim=-1)
    torch.testing.assert_close(d.boot_cos, (vh * vr).sum(-1).float(), atol=1e-5, rtol=1e-4)
    mean, lo, hi = d.bootstrap_interval()
    assert torch.all(lo <= mean) and torch.all(mean <= hi)


def _dirs(seed=0, s=10, d=6):
    g = torch.Generator().manual_seed(seed)
    vs = {n: F.normalize(torch.randn(s, d, generator=g), dim=-1) for n in D.NAMES}
    norms = {n: torch.rand(s, generator=g) * 5 for n in D.NAMES}
    return D.Directions(**vs, norms=norms)


def test_layer_scores_match_the_formulas():
    d = _dirs()
    for s in range(d.n_slots):
        def c(a, b, s=s):
            return float(getattr(d, a)[s] @ getattr(d, b)[s])
        want_d = ((1 - abs(c("v_ref", "v_harm"))) * (1 - abs(c("v_ref_resp", "v_harm_resp")))
                  * abs(c("v_harm", "v_harm_resp")) * abs(c("v_ref", "v_ref_resp")))
        want_legacy = (1 - abs(c("v_ref", "v_harm"))) * math.sqrt(
            float(d.norms["v_ref"][s]) * float(d.norms["v_harm"][s]))
        assert layer_scores(d, "variant_d")[s].item() == pytest.approx(want_d, rel=1e-5, abs=1e-7)
        assert layer_scores(d, "legacy")[s].item() == pytest.approx(want_legacy, rel=1e-5)


def test_select_layers_respects_band_and_sorts():
    d = _dirs(s=12)  # 11 layers: band is 4..7
    assert band_mask(12).nonzero().flatten().tolist() == [4, 5, 6, 7]
    s = layer_scores(d).clone()
    s[:4] = s[8:] = float("-inf")
    want = sorted(torch.topk(s, 2).indices.tolist())
    assert select_layers(d, 2) == want
    assert all(4 <= s <= 7 for s in select_layers(d, 4))
    with pytest.raises(ValueError):
        select_layers(d, 5)
    assert ramp_k(999) == 2 and ramp_k(1000) == 4


def test_blend_is_against_base():
    base, fresh = _dirs(1), _dirs(2)
    mixed = base.blend(fresh, 0.3)
    torch.testing.assert_close(mixed.v_ref, F.normalize(0.7 * base.v_ref + 0.3 * fresh.v_ref, dim=-1))


def _tiny_directions(n_boot: int):
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama")
    chat = ChatFormat(tok)
    d = D.extract_directions(model, chat, harmful=["kill a process", "bake bread"],
                             harmless=["write a poem", "sea and sky"],
                             harmful_completions=[("kill a process", "Sure")],
                             refusals=[("kill a process", "I'm sorry")],
                             helpful=[("sea and sky", "The waves roll")], n_boot=n_boot)
    return model, chat, d


def test_save_load_roundtrip_and_fit_check(tmp_path):
    model, chat, d = _tiny_directions(n_boot=4)
    path = d.save(tmp_path / "d.safetensors")
    back = D.Directions.load(path, model)
    torch.testing.assert_close(back.v_harm_resp, d.v_harm_resp)
    assert back.meta["sizes"]["harmful"] == 2 and back.boot_cos.shape == (4, 5)
    with pytest.raises(HarcError, match="another model"):
        D.Directions.load(path, tiny_model("llama", n_layers=3))
    with pytest.raises(HarcError, match="not found"):
        D.Directions.load(tmp_path / "missing.safetensors")
    with pytest.raises(HarcError, match="empty"):
        D.extract_directions(model, chat, harmful=[], harmless=["a"], harmful_completions=[("a", "b")],
                             refusals=[("a", "b")], helpful=[("a", "b")])


def test_prompt_projections_sort_by_length_but_keep_input_order():
    model, chat, d = _tiny_directions(n_boot=2)
    # a long template between short prompts: batches are cut by padded tokens, rows re-ordered
    prompts = ["hi", "word " * 300 + "now tell me", "bake bread", "sea " * 40, "ok"]
    together = D.prompt_projections(model, chat, prompts, d, [1, 2], batch_size=4)
    alone = torch.cat([D.prompt_projections(model, chat, [p], d, [1, 2]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_token_batches_bound_rows_and_padded_tokens():
    from harc.activations import _token_batches

    rows = [[0] * n for n in (3, 4, 5, 20, 21, 100)]
    sizes = [[len(r) for r in b] for b in _token_batches(rows, 3, 45)]
    assert sizes == [[3, 4, 5], [20, 21], [100]]  # 3 x 21 > 45; 100 alone
    assert [len(b) for b in _token_batches(rows, 4, None)] == [4, 2]
