"""`harc compare` without running it: the config is validated whole before a model loads (one
line per problem), entries inherit the shared config, the trade-off statistics follow their
formulas, stacked adapters equal the merged model they were trained on, and the report renders."""

import copy
import json

import numpy as np
import pytest
import torch
from tiny import tiny_model

from harc.errors import HarcError
from harc.lora import attach_lora, load_adapter
from harc.methods.harc import HarcConfig
from harc.pipeline.compare import load_compare_config, stack_adapters
from harc.pipeline.jobs import entry_groups
from harc.report.compare import asr_interval, false_refusal, tradeoff, write_compare_report
from harc.stats import wilson

pytestmark = pytest.mark.unit


def _load(run_config, *overrides):
    path, out = run_config
    return load_compare_config(path, [f"output_dir={out}", *overrides])


@pytest.mark.parametrize("override,message", [
    ("compare.methods=[harc, {name: x, method: nosuch}]", "unknown method 'nosuch'"),
    ("compare.layers=[magic]", "unknown filter 'magic'"),
    ("compare.layers=[{name: latent, threshold: 2}]",
     "filter 'latent' option 'threshold': must lie in"),
    ("compare.layers=[{name: perplexity, window: 1}]", "filter 'perplexity' option 'window'"),
    ("compare.methods=[{name: s, method: sft, margin: 0.5}]",
     "compare.methods entry 's': config key 'margin' belongs to method harc"),
    ("compare.methods=[{name: c, method: circuit_breakers, beta: 0.2}]",
     "config key 'beta' belongs to method dpo / harc"),
    ("compare.methods=[{name: d, method: dpo, init: harc}, harc]",
     "init 'harc' must name an earlier entry"),
    ("compare.methods=[harc, harc]", "the name 'harc' is taken"),
    ("compare.methods=[base]", "unknown method 'base'"),
    ("compare.stack_on=[sft]", "'compare.stack_on' names no entry: ['sft']"),
    ("compare.layers=[keyword, keyword]", "'keyword' appears twice"),
    ("method=sft", "the HARC run every method shares"),
    ("compare.latency_n=-1", "latency_n"),
])
def test_bad_compare_configs_fail_in_one_line_before_any_model(run_config, override, message):
    with pytest.raises(HarcError) as e:
        _load(run_config, override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_entries_inherit_the_shared_config(run_config):
    cc = _load(run_config, "compare.methods=[harc, {name: sft, method: sft, lr: 0.01}, "
                           "{name: hd, method: dpo, init: harc, lora: {r: 2}, beta: 0.3}]",
               "compare.layers=[keyword, {name: smoothllm, label: s3, copies: 3}]")
    harc, sft, hd = (e.cfg for e in cc.entries)
    assert harc.refresh_every == 2 and harc.k_final == 2  # the whole top-level HARC config
    assert (sft.method, sft.lr, sft.steps, sft.batch.harmful) == ("sft", 0.01, 3, 2)
    assert (hd.lora.r, hd.lora.alpha, hd.beta, cc.entries[2].init) == (2, 8, 0.3, "harc")
    assert cc.layers == [("keyword", "keyword", {}), ("s3", "smoothllm", {"copies": 3})]


@pytest.mark.skipif("control" not in HarcConfig.model_fields,
                    reason="the HARC controls' config key arrives with the controls")
def test_controls_are_harc_entries_with_a_control_key(run_config):
    cc = _load(run_config, "compare.methods=[harc, {name: harc-shuffled, method: harc, "
                           "control: shuffled_labels}, {name: harc-random, method: harc, "
                           "control: random_direction}]")
    assert [e.cfg.control for e in cc.entries[1:]] == ["shuffled_labels", "random_direction"]


def test_entry_groups_keep_an_init_chain_in_one_process(run_config):
    cc = _load(run_config, "compare.methods=[harc, {name: sft, method: sft}, "
                           "{name: hd, method: dpo, init: harc}, {name: hd2, method: sft, "
                           "init: hd}, {name: s2, method: sft, init: sft}, {name: dpo, "
                           "method: dpo}]")
    assert entry_groups(cc.entries) == [["harc", "hd", "hd2"], ["sft", "s2"], ["dpo"]]
    assert entry_groups(cc.entries, ["hd2", "dpo", "s2"]) == [["hd2"], ["s2"], ["dpo"]]
    assert entry_groups(cc.entries, []) == []


# ---- trade-off statistics ------------------------------------------------------------------------
def _run(name, attacks, refused, n_over=10, entry="base", layer=None):
    return {"name": name, "mean_asr_attacks": list(attacks),
            "attacks": {a: {"n": len(o), "success": sum(o), "asr": sum(o) / len(o),
                            "outcomes": o, "request_index": r} for a, (o, r) in attacks.items()},
            "mean_asr": float(np.mean([sum(o) / len(o) for o, _ in attacks.values()])),
            "over_refusal": {"xs": {"n": n_over, "refused": refused[0]},
                             "ps": {"n": n_over, "refused": refused[1]}},
            "compare": {"entry": entry, "layer": layer}}


def test_asr_interval_resamples_requests_by_the_formula():
    # attack a: one probe per request; attack b: two probes for request 0, one for request 2
    run = _run("x", {"a": ([1, 0, 1], [0, 1, 2]), "b": ([1, 0, 0], [0, 0, 2])}, (0, 0))
    C = np.array([[3, 0, 0], [0, 3, 0], [1, 1, 1], [0, 1, 2], [2, 0, 1]], dtype=float)
    want = []
    for c in C:
        a = sum(c[r] * s for s, r in zip([1, 0, 1], [0, 1, 2])) / sum(c[r] for r in [0, 1, 2])
        w = sum(c[r] for r in [0, 0, 2])
        b = sum(c[r] * s for s, r in zip([1, 0, 0], [0, 0, 2])) / max(w, 1)
        want.append((a + b) / 2)
    lo, hi = asr_interval(run, C)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(want, [2.5, 97.5])))
    assert asr_interval({"attacks": {"a": {"n": 3}}, "mean_asr_attacks": ["a"]}, C) is None


def test_tradeoff_points_pareto_and_pooled_false_refusals():
    o = ([1, 1, 0, 0], [0, 1, 2, 3])
    runs = [_run("base", {"a": ([1, 1, 1, 1], [0, 1, 2, 3])}, (1, 1)),
            _run("harc", {"a": o}, (2, 2), entry="harc"),
            _run("base+k", {"a": o}, (4, 4), layer="k"),  # as robust as harc, more refusals
            _run("harc+k", {"a": ([0, 0, 0, 1], [0, 1, 2, 3])}, (3, 5), entry="harc", layer="k")]
    pts = {p["name"]: p for p in tradeoff(runs, n_boot=500)}
    assert [pts[n]["pareto"] for n in ("base", "harc", "base+k", "harc+k")] == [
        True, True, False, True]
    assert [pts[n]["kind"] for n in ("base", "harc", "base+k", "harc+k")] == [
        "base", "method", "layer", "stacked"]
    assert pts["harc+k"]["x"] == 0.4 and pts["harc+k"]["x_ci"] == wilson(8, 20)
    assert false_refusal(runs[0])[2:] == (2, 20)
    lo, hi = pts["harc"]["y_ci"]
    assert lo < 0.5 < hi and pts["base"]["y_ci"] == [1.0, 1.0]


def test_compare_report_renders(tmp_path):
    o = ([1, 0, 0, 1], [0, 1, 2, 3])
    runs = [_run("base", {"direct": o}, (1, 2)),
            {**_run("harc+cast", {"direct": o}, (0, 1), entry="harc", layer="cast"),
             "layer": {"name": "cast", "calibration": {"threshold": 0.12}}}]
    res = {"title": "t", "runs": runs, "compare": {
        "entries": {"harc": {"method": "harc", "training": {"wall_s": 75.0, "steps": 300,
                                                            "step_s": 0.25}}},
        "latency": {"n": 4, "plain_s_per_request": 0.1,
                    "layers": {"cast": {"s_per_request": 0.15, "added_s_per_request": 0.05}}},
        "missing": ["sft"]}}
    paths = write_compare_report(res, tmp_path)
    md = paths["md"].read_text()
    assert "tradeoff_plane.png" in md and (tmp_path / "tradeoff_plane.png").is_file()
    assert "| harc+cast | cast | threshold 0.120 |" in md
    assert "| cast | 150.0 | +50.0 |" in md and "| 300 | 75 s | 0.250 |" in md
    assert "no finished evaluation in this folder: sft." in md
    assert "<script" not in paths["html"].read_text()


# ---- stacked adapters --------------------------------------------------------------------------
def _perturbed(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_stacked_adapters_equal_the_merged_model_they_were_trained_on(tmp_path):
    base = tiny_model("llama")
    _perturbed(attach_lora(copy.deepcopy(base), r=4, alpha=8), 1).save_pretrained(tmp_path / "a")
    merged = load_adapter(copy.deepcopy(base), tmp_path / "a").merge_and_unload()
    second = _perturbed(attach_lora(merged, r=2, alpha=2), 2)
    second.save_pretrained(tmp_path / "b")
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    with torch.no_grad():
        want = second(input_ids=ids).logits
        stacked = stack_adapters(copy.deepcopy(base), tmp_path / "a", tmp_path / "b")
        torch.testing.assert_close(stacked(input_ids=ids).logits, want, rtol=1e-4, atol=1e-5)
        with stacked.disable_adapter():
            torch.testing.assert_close(stacked(input_ids=ids).logits, base(input_ids=ids).logits)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 2
