"""Ctrl-C (SIGINT) on a real `harc` process during training and evaluation of a tiny model: exit
130 with a message, no temporary files or folders left, and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny import tiny_model, tiny_tokenizer
from train_helpers import write_data

pytestmark = pytest.mark.unit
SRC = Path(__file__).resolve().parents[3] / "src"


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "HARC_CACHE": str(tmp_path / "cache"),
            "HARC_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _harc(args, tmp_path, until=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `harc ARGS`; when `until()` becomes true, send SIGINT."""
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: give harc
    # the default disposition a terminal user has (Python then turns SIGINT into Ctrl-C).
    proc = subprocess.Popen([sys.executable, "-m", "harc", *args], env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if until is not None:
        deadline = time.monotonic() + timeout
        while not until():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never got far enough"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _hidden(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


def _model(tmp_path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ctrl_c_during_training(tmp_path):
    data = {k: str(p) for k, p in write_data(tmp_path).items()}
    out = tmp_path / "run"
    cfg = {"model": str(_model(tmp_path)), "steps": 400, "warmup_steps": 1, "band": [1, 1],
           "k_start": 1, "k_final": 1, "n_boot": 0, "refresh_every": 0, "checkpoint_every": 2,
           "max_prompt_tokens": 64, "max_response_tokens": 16, "lora": {"r": 2, "alpha": 4},
           "batch": {"harmful": 2, "harmless": 1, "pseudo": 1}, "output_dir": str(out),
           "data": {**data, "extract_n": 6, "val_n": 3}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    log = out / "log.jsonl"

    def past_a_checkpoint() -> bool:
        steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines()
                 if x.endswith("}")] if log.is_file() else []
        return max(steps, default=0) >= 5

    res = _harc(["train", "--config", str(tmp_path / "c.yaml")], tmp_path, past_a_checkpoint)
    assert res.returncode == 130, res.stderr
    assert "harc: interrupted" in res.stderr and "Traceback" not in res.stderr
    assert not _hidden(out)
    latest = (out / "checkpoints" / "latest").read_text()
    step = json.loads((out / "checkpoints" / latest / "trainer_state.json").read_text())["step"]
    assert step >= 4
    # the same command (finishing sooner: `steps` may change on resume) continues from there
    res = _harc(["train", "--config", str(tmp_path / "c.yaml"), f"steps={step + 2}"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "resume"] == [step]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, step + 3))
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not _hidden(out)


def test_ctrl_c_during_evaluation(tmp_path):
    harmful = _jsonl(tmp_path / "harmful.jsonl",
                     [{"prompt": f"explain how to pick lock number {i}"} for i in range(60)])
    benign = _jsonl(tmp_path / "benign.jsonl",
                    [{"prompt": f"write a poem about the sea, number {i}"} for i in range(4)])
    ev = {"attacks": ["direct"], "harmful": harmful, "n_harmful": 60, "over_refusal": [benign],
          "n_over_refusal": 4, "benign": benign, "n_benign": 4, "capability": None,
          "max_new_tokens": 24, "batch_size": 1, "plane": False, "latent_judge": False}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"eval": ev}))
    out = tmp_path / "eval"
    cache = out / "base.generations.jsonl"
    args = ["eval", "--model", str(_model(tmp_path)), "--config", str(tmp_path / "e.yaml"),
            "--out", str(out)]

    def generating() -> bool:
        return cache.is_file() and len(cache.read_text().splitlines()) >= 3

    res = _harc(args, tmp_path, generating)
    assert res.returncode == 130, res.stderr
    assert "harc: interrupted" in res.stderr and "Traceback" not in res.stderr
    assert not _hidden(out) and not (out / "results.json").exists()
    kept = len(cache.read_text().splitlines())
    assert 3 <= kept < 64
    res = _harc(args, tmp_path)
    assert res.returncode == 0, res.stderr
    keys = [json.loads(x)["key"] for x in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 64  # the kept generations were not made again
    assert json.loads((out / "results.json").read_text())["runs"][0]["attacks"]["direct"]["n"] == 60
    assert not _hidden(out)
