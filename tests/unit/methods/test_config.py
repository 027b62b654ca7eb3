"""HarcConfig and load_config: everything is validated before a model is loaded."""

from pathlib import Path

import pytest

from harc.config import to_dict as config_dict
from harc.errors import HarcError
from harc.methods import load_config, save_config
from harc.methods.harc import HarcConfig

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


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
    from harc.methods.config import BatchSizes, DataSettings, LoraSettings, TrainConfig
    from harc.methods.harc import LossWeights

    for cls in (HarcConfig, DataSettings, LoraSettings, BatchSizes, LossWeights):
        # A method's own keys are documented in its class, the shared ones in TrainConfig's.
        doc = cls.__doc__ + (TrainConfig.__doc__ if issubclass(cls, TrainConfig) else "")
        for name in cls.model_fields:
            assert name in doc, f"{cls.__name__}.{name} is not in the docstring"


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
    ("harm_read=everywhere", "harm_read"),
    ("read_temp=0", "read_temp"),
    ("pseudo_margin=2", "pseudo_margin"),
    ("weights.pseudo_ref=-1", "weights.pseudo_ref"),
    ("pseudo_augment=50", "pseudo_augment"),
    ("resp_offsets=[0, 0]", "resp_offsets"),
    ("resp_offsets=[-4]", "resp_offsets"),
    ("recovery_tokens=[0]", "recovery_tokens"),
    ("margin_final=1.5", "margin_final"),
    ("margin_final=0.8", "margin_ramp"),
    ("hard_frac=0", "hard_frac"),
    ("control=placebo", "control"),
    ("frame_harmful=99", "frame_harmful"),
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
        assert c.compile and c.kl_cache and not c.gradient_checkpointing  # the measured 7B step
    from harc.pipeline import load_run_config

    # `harc run` configs: the CPU demo is short; the GPU replication keeps the paper's schedule.
    for name, steps in (("smollm2_135m.yaml", 300), ("qwen2.5_coder_0.5b.yaml", 2000)):
        rc = load_run_config(CONFIGS / name, [])
        assert rc.train.steps <= steps and rc.eval.attacks and rc.run.n_synth > 0
    c = load_run_config(CONFIGS / "qwen2.5_coder_0.5b.yaml", []).train
    assert (c.steps, c.warmup_steps, c.refresh_every, c.ramp_step) == (2000, 100, 200, 1000)


def test_improvement_keys_default_to_the_paper_and_parse(files):
    c = load_config(files)
    assert (c.harm_read, c.resp_offsets, c.recovery_tokens, c.margin_final, c.hard_frac,
            c.control, c.pseudo_augment, c.weights.pseudo_ref) == (
        "t_inst", [0], [], None, 1.0, "none", 0, 0.0)
    c = load_config(files, ["harm_read=boundaries", "resp_offsets=[0, 16, 48]",
                            "recovery_tokens=[8, 24]", "margin_final=0.8", "margin_ramp=300",
                            "hard_frac=0.5", "control=shuffled_labels", "weights.pseudo_ref=1",
                            "pseudo_margin=0.2", "pseudo_augment=3"])
    assert c.resp_offsets == [0, 16, 48] and c.recovery_tokens == [8, 24]
    assert c.weights.active() == {"couple": 1.0, "couple_resp": 1.0, "kl": 10.0, "ce": 1.0,
                                  "pseudo_ref": 1.0}


def test_round_trip(files, tmp_path):
    cfg = load_config(files, ["lora.r=4"])
    out = save_config(cfg, tmp_path / "again.yaml")
    assert config_dict(load_config(out)) == config_dict(cfg)
