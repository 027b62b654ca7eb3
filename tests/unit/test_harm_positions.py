"""docs/results/harm_positions.py on a tiny model: every reading of every group is filled in and
agrees with a direct computation."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model, tiny_tokenizer

from harc.activations import ResidualCapture
from harc.chat import ChatFormat

pytestmark = pytest.mark.unit
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "harm_positions.py"


def _script():
    spec = importlib.util.spec_from_file_location("harm_positions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_auroc():
    hp = _script()
    assert hp.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert hp.auroc([0.1], [0.9]) == 0.0 and hp.auroc([0.5], [0.5]) == 0.5
    assert hp.auroc([], [0.1]) is None


def test_measure_fills_every_reading():
    hp = _script()
    torch.set_num_threads(1)
    model, chat = tiny_model("llama", n_layers=3), ChatFormat(tiny_tokenizer(), max_prompt_tokens=4096)
    requests = [{"prompt": "how to build a weapon"}, {"prompt": "steps to steal a car"}]
    harmless = {"benign": ["bake bread", "write a poem"], "pseudo": ["kill a python process"]}
    ext_h = ["make poison now", "hack the bank", "write malware"]
    ext_b = ["explain tides", "the sea and sky", "mix flour"]
    table = hp.measure(model, chat, requests, harmless, ext_h, ext_b, [1, 2],
                       attacks=["direct", "refusal_suppression"], batch_size=2)
    assert set(table) == {"direct", "refusal_suppression", "harmless:benign", "harmless:pseudo"}
    rs = table["refusal_suppression"]
    assert rs["n"] == 2 and rs["request_found"] == 2
    cell = rs["t_inst"]["1"]
    assert set(hp.READINGS) <= set(cell) and all(cell[r] is not None for r in hp.READINGS)
    assert cell["max_user"] >= cell["softmax_user"] >= cell["user_mean"] - 1e-6
    assert cell["max_user"] >= max(cell["t_inst"], cell["request_end"], cell["boundaries"]) - 1e-6
    assert set(cell["auroc_vs_pseudo"]) == set(hp.READINGS)
    assert set(rs["read:boundaries"]["2"]) >= {"boundaries", "t_inst"}
    assert table["direct"]["t_inst"]["1"]["t_inst"] == pytest.approx(
        table["direct"]["t_inst"]["1"]["request_end"], abs=1e-4)  # the request ends at t_inst
    # t_inst by hand for the first direct request
    v = hp.t_inst_directions(model, chat, ext_h, ext_b, [1], 2)[0]
    vals = []
    for r in requests:
        ids = chat.encode_prompt(r["prompt"])
        with torch.no_grad():
            h = ResidualCapture(model, [1]).run(model, input_ids=torch.tensor([ids]))[1][0]
        vals.append(float(F.cosine_similarity(h[chat.t_inst], v, dim=0)))
    assert table["direct"]["t_inst"]["1"]["t_inst"] == pytest.approx(sum(vals) / 2, abs=1e-4)
