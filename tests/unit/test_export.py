"""Portable adapters, the model card, `harc export` and `harc merge` (issues #15 item 3, #16 item 7)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model, tiny_tokenizer
from train_helpers import make_trainer, perturb_lora

import harc.export as X
from harc.cli import main as harc_main
from harc.directions import Directions
from harc.errors import HarcError
from harc.lora import attach_lora, base_model_ids, check_adapter_compat
from harc.models import unwrap

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_example.json"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _directions(n_slots: int, hidden: int, **meta) -> Directions:
    v = [torch.nn.functional.normalize(torch.randn(n_slots, hidden), dim=-1) for _ in range(4)]
    return Directions(*v, norms={}, meta=meta)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A harc adapter of a tiny model that stands in for the built-in SmolLM2."""
    tmp = tmp_path_factory.mktemp("adapter")
    tr = make_trainer(tmp, refresh_every=0)
    unwrap(tr.model).harc_spec = "smollm2-135m-instruct"
    return tr.model, tr.save_adapter(tmp / "adapter")


# ---------------------------------------------------------------- portable base model id


def test_adapter_config_names_the_hub_id_and_still_loads(adapter, tmp_path):
    model, path = adapter
    acfg = json.loads((path / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == SMOL
    assert check_adapter_compat(model, path)["base_model_name_or_path"] == SMOL
    # an adapter written before: an absolute path into the cache is still accepted
    acfg["base_model_name_or_path"] = "/home/u/.cache/harc/models/smollm2-135m-instruct"
    old = tmp_path / "old"
    old.mkdir()
    for f in path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    (old / "adapter_config.json").write_text(json.dumps(acfg))
    check_adapter_compat(model, old)


def test_base_model_ids_of_each_kind_of_spec(tmp_path):
    assert base_model_ids("smollm2-135m-instruct") == (SMOL, SMOL)
    assert base_model_ids("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct",) * 2
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert base_model_ids(str(folder)) == (str(folder), None)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen2.5-7B"}))
    assert base_model_ids(str(folder)) == (str(folder), "Qwen/Qwen2.5-7B")
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "/abs/elsewhere"}))
    assert base_model_ids(str(folder)) == (str(folder), None)


# ---------------------------------------------------------------- export and the model card


def test_model_card_names_the_hub_base_and_what_the_directions_are(adapter):
    from huggingface_hub import ModelCard

    model, path = adapter
    meta = json.loads((path / "harc_adapter.json").read_text())
    dirs = path.parent / "dirs.safetensors"
    _directions(meta["n_layers"] + 1, meta["hidden_size"], model="smollm2-135m-instruct").save(dirs)
    X.export_adapter(path, dirs, FIXTURE)
    card = ModelCard.load(path / "README.md")
    assert card.data.base_model == SMOL
    assert card.data.library_name == "peft" and card.data.license == "apache-2.0"
    assert "harc" in card.data.tags
    assert f"# HARC adapter for {SMOL}" in card.text
    assert "(harc built-in `smollm2-135m-instruct`)" in card.text
    assert "`directions.safetensors` (the base directions, extracted from smollm2" in card.text
    for f in ("extract/", "train/directions", "train/adapter/", "geometry_after/"):
        assert f in card.text
    assert "| harc | 16.0% |" in card.text  # the evaluation table, labels via run_label
    assert (path / "directions.safetensors").read_bytes() == dirs.read_bytes()


def test_export_refuses_what_is_not_a_harc_directions_file(adapter, tmp_path):
    _, path = adapter
    before = sorted(p.name for p in path.iterdir())
    bogus = tmp_path / "x.jsonl"
    bogus.write_text('{"prompt": "hi"}\n')
    with pytest.raises(HarcError, match="not a harc directions file"):
        X.export_adapter(path, bogus)
    foreign = tmp_path / "foreign.safetensors"
    _directions(13, 64).save(foreign)
    with pytest.raises(HarcError, match="another model"):
        X.export_adapter(path, foreign)
    assert sorted(p.name for p in path.iterdir()) == before


# ---------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    """A tiny base stored in bfloat16 and an adapter trained on it (small, nonzero LoRA B)."""
    tmp = tmp_path_factory.mktemp("merge")
    base = tmp / "base"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(base)
    tiny_tokenizer("chatml").save_pretrained(base)
    from transformers import AutoModelForCausalLM

    peft = attach_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), r=4,
                       alpha=8)
    perturb_lora(peft)
    peft.save_pretrained(tmp / "adapter")
    return base, tmp / "adapter"


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_merge_keeps_the_base_dtype_unless_asked(bf16_base, tmp_path):
    base, adapter = bf16_base
    res = X.merge_adapter(str(base), adapter, tmp_path / "merged", device="cpu")
    assert res["dtype"] == "bfloat16" and res["out"] == tmp_path / "merged"
    assert _saved_dtypes(tmp_path / "merged") == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    res = X.merge_adapter(str(base), adapter, tmp_path / "merged", device="cpu",
                          dtype="float32")  # replaces the previous merge, atomically
    assert res["dtype"] == "float32" and _saved_dtypes(tmp_path / "merged") == {torch.float32}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temp folder left


def test_merge_into_an_existing_file_is_one_line_before_any_model_loads(bf16_base, tmp_path,
                                                                        monkeypatch, capsys):
    base, adapter = bf16_base
    target = tmp_path / "out.bin"
    target.write_text("keep me")
    monkeypatch.setattr(X, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        harc_main(["merge", "--adapter", str(adapter), "--out", str(target), "--model",
                   str(base)])
    assert exit_.value.code != 0
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert "is a file" in err and "\n" not in err and "merged" not in cap.out
    assert target.read_text() == "keep me"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(HarcError, match="holds other files"):
        X.merge_adapter(str(base), adapter, other)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
