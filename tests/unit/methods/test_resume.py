"""Resume robustness: a torn last log line, a damaged newest checkpoint, interrupted checkpoint
writes and file permissions."""

import json
import os
import stat

import pytest
import torch
from train_helpers import adapter_state, make_trainer

import harc.methods.engine as engine
from harc.errors import HarcError

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]



def kill_at(tr, micro_step: int) -> None:
    """Make the trainer die (as on Ctrl-C) at the given 1-based micro-step."""
    calls, orig = [0], tr.method.micro_step

    def dying(mb, scale):
        calls[0] += 1
        if calls[0] == micro_step:
            raise KeyboardInterrupt
        return orig(mb, scale)

    tr.method.micro_step = dying
    with pytest.raises(KeyboardInterrupt):
        tr.train()


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def full6(tmp_path_factory):
    """The adapter of an uninterrupted 6-step run (checkpoints at 2, 4, 6)."""
    tr = make_trainer(tmp_path_factory.mktemp("full"), steps=6)
    tr.train()
    return adapter_state(tr.model)


def test_torn_last_log_line_is_dropped_on_resume(tmp_path, full6):
    kill_at(make_trainer(tmp_path, steps=6), 9)  # step 5, first micro-batch
    log = tmp_path / "run" / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 0.5, "kl"')  # a write cut short by the crash
    resumed = make_trainer(tmp_path, steps=6)
    resumed.train()
    assert_same_adapter(adapter_state(resumed.model), full6)
    rows = [json.loads(x) for x in log.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, full6, capsys):
    kill_at(make_trainer(tmp_path, steps=6), 9)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000004"
    opt = ckpts / "step-0000004" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])  # cut short
    resumed = make_trainer(tmp_path, steps=6)
    resumed.train()
    assert_same_adapter(adapter_state(resumed.model), full6)
    assert "step-0000004 is damaged" in capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    resume = [r for r in rows if r.get("event") == "resume"]
    assert resume and resume[-1]["checkpoint"].endswith("step-0000002")
    assert any(r.get("event") == "damaged_checkpoints" for r in rows)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    kill_at(make_trainer(tmp_path, steps=6), 9)
    for p in (tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json"):
        p.write_text("{")
    with pytest.raises(HarcError, match="no intact checkpoint"):
        make_trainer(tmp_path, steps=6).train()


def test_interrupted_checkpoint_leaves_no_temporary_folder(tmp_path, monkeypatch):
    tr = make_trainer(tmp_path, steps=2, checkpoint_every=1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "save_rng", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    ckpts = tmp_path / "run" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    # left over by a hard kill (no Python cleanup): removed when training starts again
    monkeypatch.undo()
    (ckpts / ".step-0000001.x1y2.tmp").mkdir()
    (ckpts / ".step-0000001.x1y2.tmp" / "optimizer.safetensors").write_bytes(b"half")
    (tmp_path / "run" / ".adapter.abcd.tmp").mkdir()
    make_trainer(tmp_path, steps=2, checkpoint_every=1).train()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_adapter_and_checkpoint_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        make_trainer(tmp_path, steps=1, checkpoint_every=1, refresh_every=0).train()
    finally:
        os.umask(old)
    run = tmp_path / "run"
    for path in [run / "adapter", run / "checkpoints" / "step-0000001",
                 run / "checkpoints" / "step-0000001" / "adapter"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask, path
    for path in [run / "adapter" / "adapter_model.safetensors",
                 run / "checkpoints" / "step-0000001" / "optimizer.safetensors",
                 run / "checkpoints" / "latest", run / "log.jsonl"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
