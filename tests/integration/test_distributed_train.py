"""Training in two CPU processes under torchrun (gloo), DDP and FSDP2, against one process: the same
loss curve, log and adapter, through gradient accumulation, a direction refresh, a kill and a
resume from a checkpoint; directions and adapter identical on every rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from dist_train_worker import run_config  # noqa: E402
from tiny import tiny_model, tiny_tokenizer  # noqa: E402
from train_helpers import make_data, write_data  # noqa: E402

from harc.methods import Trainer  # noqa: E402

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("dist_train_worker.py")
CLOSE = dict(rtol=2e-4, atol=2e-6)


def launch(out: Path, strategy: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    out.mkdir()
    with open(out / "output.txt", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
             "2", str(WORKER), str(out), strategy], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"single": run folder, "ddp": (run folder, per-rank results), "fsdp": ...}; the
    two-process runs go one after the other while this process trains the single reference."""
    base = tmp_path_factory.mktemp("dtrain")
    procs = {}
    procs["ddp"] = launch(base / "ddp", "ddp")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(run_config(base / "single"), tiny_model("llama"), tiny_tokenizer("chatml"),
                make_data()).train()
    finally:
        torch.set_num_threads(n)
    out = {"single": base / "single" / "run"}
    for strategy in ("ddp", "fsdp"):
        if strategy not in procs:
            procs[strategy] = launch(base / strategy, strategy)
        try:
            code = procs[strategy].wait(timeout=600)
        finally:
            procs[strategy].kill()
        assert code == 0, (base / strategy / "output.txt").read_text()[-4000:]
        ranks = [torch.load(base / strategy / f"rank{r}.pt", weights_only=False) for r in range(2)]
        out[strategy] = (base / strategy / "run", ranks)
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def assert_close_records(got, want, path=""):
    """Numbers within float tolerance, integers, strings and lists of layers exactly."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            if k not in ("step_s", "tokens_per_s", "seconds", "checkpoint"):
                assert_close_records(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close_records(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), msg=path, **CLOSE)
    else:
        assert got == want, path


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_log_the_loss_curve_of_one(runs, strategy):
    run, ranks = runs[strategy]
    single, multi = records(runs["single"]), records(run)
    assert ranks[0]["killed_at_step"] == 2 and ranks[0]["resumed_at_step"] == 4
    # rank 0 alone wrote the log: the steps before the kill, the resume, the rest, once each
    assert [r.get("event", r["step"]) for r in multi] == \
        ["start", 1, 2, "refresh", "resume", 3, 4, "end"]
    multi = [r for r in multi if r.get("event") != "resume"]
    assert [r.get("event", r["step"]) for r in single] == [r.get("event", r["step"]) for r in multi]
    for got, want in zip(multi, single, strict=True):
        assert_close_records(got, want, f"step {want['step']} {want.get('event', '')}")
    losses = [r["loss"] for r in multi if "loss" in r]
    assert len(set(losses)) == 4 and all(r["tokens"] > 0 for r in multi if "loss" in r)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_adapter_of_one(runs, strategy):
    run, ranks = runs[strategy]
    want = load_file(str(runs["single"] / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and len(want) == 56
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k, **CLOSE)
    assert max(v.abs().max() for k, v in want.items() if "lora_B" in k) > 1e-3  # it trained
    for name in ("directions.safetensors", "base_directions.safetensors"):
        a, b = load_file(str(run / name)), load_file(str(runs["single"] / name))
        for k in b:
            torch.testing.assert_close(a[k], b[k], msg=f"{name}:{k}", **CLOSE)
    # the last checkpoint's optimizer state, written in one process's layout
    step4 = "checkpoints/step-0000004/optimizer.safetensors"
    a, b = load_file(str(run / step4)), load_file(str(runs["single"] / step4))
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], msg=k, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nonfinite_step_on_one_rank_is_dropped_by_every_rank(runs, strategy):
    run, ranks = runs[strategy]
    for r in ranks:  # one of two steps dropped: Adam counted one update
        assert r["nan_skipped"] == 1 and r["nan_adam_steps"] == [1]
    rows = records(run.parent / "nan" / "run")
    assert [r.get("event", r["step"]) for r in rows] == ["start", "nonfinite", 2, "end"]
    assert rows[1]["terms"] == ["kl"] and rows[1]["step"] == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_ends_with_the_same_directions_and_adapter(runs, strategy):
    _, (r0, r1) = runs[strategy]
    assert r0["layers"] == r1["layers"]
    assert torch.equal(r0["v_ref"], r1["v_ref"])
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k


def test_a_checkpoint_of_two_fsdp_processes_resumes_in_one(runs, tmp_path):
    ckpt = runs["fsdp"][0] / "checkpoints" / "step-0000002"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(run_config(tmp_path, resume=str(ckpt)), tiny_model("llama"),
                tiny_tokenizer("chatml"), make_data()).train()
    finally:
        torch.set_num_threads(n)
    want = load_file(str(runs["single"] / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k, **CLOSE)


def test_train_command_relaunches_itself_in_two_processes(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer("chatml").save_pretrained(tmp_path / "tiny")
    files = write_data(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tmp_path / 'tiny'}\ndata:\n  harmful: {files['harmful']}\n"
        f"  harmless: {files['harmless']}\n  pseudo: {files['pseudo']}\n  extract_n: 6\n"
        "  val_n: 3\nsteps: 2\ngrad_accum: 2\nwarmup_steps: 1\nband: [1, 1]\nrefresh_every: 0\n"
        "n_boot: 0\nmax_prompt_tokens: 64\nmax_response_tokens: 32\nlora: {r: 2}\n"
        "batch: {harmful: 2, harmless: 1, pseudo: 1}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "harc", "train", "--config", str(cfg),
                           "--nproc", "2", f"output_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())  # rich wraps lines
    assert said.count("loading") == 1 and "(2 processes, ddp)" in said
    assert proc.stdout.count("adapter:") == 1
    events = [r.get("event", r["step"]) for r in records(tmp_path / "run")]
    assert events == ["start", 1, 2, "end"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
