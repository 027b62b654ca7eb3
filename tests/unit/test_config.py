"""HarcConfig and load_config: everything is validated before a model is loaded."""

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from harc.errors import HarcError
from harc.train import HarcConfig, config_dict, load_config, save_config

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture
def files(tmp_path):
    for name in ("h.jsonl", "b.jsonl", "p.jsonl"):
        (tmp_path / name).write_text('{"prompt": "x", "response": "y", "refusal": "z"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  harmful: h.jsonl\n  harmless: b.jsonl\n  pseudo: p.jsonl\n"
                   "lr: 1e-4\nlora:\n  r: 8\n")
    return cfg


def test_yaml_and_overrides(files, monkeypatch):
    monkeypatch.chdir("/")  # relative data paths resolve against the config's folder
    cfg = load_config(files, ["lr=2e-4", "lora.r=16", "lora.targets=q_proj,v_proj",
                              "band=[2, 3]", "batch.pseudo=0", "gradient_checkpointing=true",
                              "max_grad_norm=1", "system_prompt=null"])
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.lora.r == 16 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.band == (2, 3) and cfg.batch.pseudo == 0 and cfg.gradient_checkpointing is True
    assert cfg.max_grad_norm == 1.0 and cfg.system_prompt is None
    assert Path(cfg.data.harmful).is_absolute() and Path(cfg.data.harmful).is_file()
    assert load_config(files).lr == 1e-4  # YAML 1.1 reads 1e-4 as a string: coerced


def test_every_key_is_documented():
    from harc.train import BatchSizes, DataSettings, LoraSettings, LossWeights

    for cls in (HarcConfig, DataSettings, LoraSettings, BatchSizes, LossWeights):
        doc = cls.__doc__
        for f in dataclasses.fields(cls):
            assert f.name in doc, f"{cls.__name__}.{f.name} is not in the docstring"


@pytest.mark.parametrize("override,key", [
    ("lrr=1", "lrr"),
    ("lora.rank=4", "lora.rank"),
    ("steps=abc", "steps"),
    ("lora.r=1.5", "lora.r"),
    ("steps=-3", "steps"),
    ("steps=0", "steps"),
    ("margin=0", "margin"),
    ("margin=1.5", "margin"),
    ("beta=2", "beta"),
    ("lr=-1e-4", "lr"),
    ("layer_score=best", "layer_score"),
    ("band=[4]", "band"),
    ("dtype=int8", "dtype"),
    ("gradient_checkpointing=maybe", "gradient_checkpointing"),
    ("data.harmful=missing.jsonl", "data.harmful"),
    ("directions=missing.safetensors", "directions"),
    ("resume=/no/such/checkpoint", "resume"),
])
def test_invalid_values_name_the_key(files, override, key):
    with pytest.raises(HarcError) as e:
        load_config(files, [override])
    assert repr(key) in str(e.value) or key in str(e.value)


def test_unknown_key_suggests_a_close_one(files):
    with pytest.raises(HarcError, match="did you mean 'warmup_steps'"):
        load_config(files, ["warmup_step=5"])


def test_required_data_and_unknown_registry_name(tmp_path):
    with pytest.raises(HarcError, match="data.harmful"):
        load_config(None, [])
    with pytest.raises(HarcError, match="data.pseudo"):
        load_config(None, ["data.harmful=circuit-breakers", "data.harmless=ultrachat-pairs"])
    with pytest.raises(HarcError, match="data.harmless"):
        load_config(None, ["data.harmful=circuit-breakers", "data.harmless=no-such-set",
                           "batch.pseudo=0"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(HarcError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(HarcError, match="mapping"):
        load_config(bad)
    bad.write_text("lr: [1,\n")
    with pytest.raises(HarcError, match="YAML"):
        load_config(bad)


def test_released_configs_match_the_paper():
    for name, steps, raw in (("llama3.1_8b.yaml", 400, None), ("qwen2_5_7b.yaml", 2000, "qwen")):
        c = load_config(CONFIGS / name)
        assert (c.lora.r, c.lora.alpha, c.lora.dropout) == (32, 64, 0.0)
        assert len(c.lora.targets) == 7
        assert (c.lr, c.warmup_steps, c.seed, c.grad_accum) == (1e-4, 100, 0, 2)
        assert (c.batch.harmful, c.batch.harmless, c.batch.pseudo) == (6, 4, 2)
        assert (c.margin, c.max_prompt_tokens, c.max_response_tokens) == (0.5, 256, 256)
        assert (c.refresh_every, c.beta, c.k_start, c.k_final, c.ramp_step) == (200, 0.3, 2, 4, 1000)
        assert (c.weights.couple, c.weights.couple_resp, c.weights.kl, c.weights.ce) == (1, 1, 10, 1)
        assert c.steps == steps and c.raw_template == raw and c.layer_score == "variant_d"
    from harc.pipeline import load_run_config

    # `harc run` configs: the CPU demo is short; the GPU replication keeps the paper's schedule.
    for name, steps in (("smollm2_135m.yaml", 300), ("qwen2.5_coder_0.5b.yaml", 2000)):
        rc = load_run_config(CONFIGS / name, [])
        assert rc.train.steps <= steps and rc.eval.attacks and rc.run.n_synth > 0
    c = load_run_config(CONFIGS / "qwen2.5_coder_0.5b.yaml", []).train
    assert (c.steps, c.warmup_steps, c.refresh_every, c.ramp_step) == (2000, 100, 200, 1000)


def test_round_trip(files, tmp_path):
    cfg = load_config(files, ["lora.r=4"])
    out = save_config(cfg, tmp_path / "again.yaml")
    assert config_dict(load_config(out)) == config_dict(cfg)


@pytest.mark.parametrize("value,tp,expect", [
    ("yes", bool, (True, True)), ("0", bool, (True, False)), ("maybe", bool, (False, "maybe")),
    (1, bool, (False, 1)), ("12", int, (True, 12)), ("1.5", int, (False, "1.5")),
    (True, int, (False, True)), (3, float, (True, 3.0)), ("1e-4", float, (True, 1e-4)),
    (False, float, (False, False)), ("x", float, (False, "x")), (2.0, int, (False, 2.0)),
])
def test_scalar_parsing_shared_by_every_config(value, tp, expect):
    from harc._config import scalar

    assert scalar(value, tp) == expect


@pytest.mark.parametrize("value,tp,expect", [
    (None, int | None, (True, None)), ("3", int | None, (True, 3)), ("x", int | None, (False, "x")),
    ("dan, aim", list[str], (True, ["dan", "aim"])), ([1, "2"], list[int], (True, [1, 2])),
    ([1, "a"], list[int], (False, [1, "a"])), ("1,2", list[int], (False, "1,2")),
    ([4, "4"], tuple[int, int], (True, (4, 4))), ([4], tuple[int, int], (False, [4])),
    ((1, 2, 3), tuple[int, ...], (True, (1, 2, 3))), ("b", Literal["a", "b"], (True, "b")),
    ("c", Literal["a", "b"], (False, "c")), ({"k": 1}, dict, (True, {"k": 1})),
    ("s", str, (True, "s")), (3, str, (False, 3)), (len, Callable, (True, len)),
])
def test_one_type_check_for_every_config(value, tp, expect):
    from harc._config import coerce

    assert coerce(value, tp) == expect
