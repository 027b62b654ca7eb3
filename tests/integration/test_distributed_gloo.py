"""Two CPU processes under torchrun (gloo): data-parallel extraction, generation and evaluation give
what one process gives, on a tiny random model; the collectives and start-up checks work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


def test_world_comes_from_torchrun_env(ranks):
    res, _ = ranks
    assert [r["world"] for r in res] == [(0, 2, "cpu"), (1, 2, "cpu")]


def test_extraction_matches_one_process_and_is_identical_on_every_rank(ranks):
    res, _ = ranks
    single, multi = res[0]["dirs_single"], res[0]["dirs_multi"]
    assert set(single) == set(multi)
    for k in single:
        torch.testing.assert_close(multi[k], single[k], rtol=1e-6, atol=1e-7, msg=k)
    # the bootstrap is the single process's, resample by resample (not just in distribution)
    assert single["boot_cos"].shape == (16, 5)
    assert single["boot_cos"].std(0).max() > 1e-3
    for k in multi:
        assert torch.equal(res[1]["dirs_multi"][k], multi[k]), k


def test_held_out_projections_match_one_process_on_every_rank(ranks):
    res, _ = ranks
    for r in res:
        assert r["proj_single"].shape == (9, 5, 2)
        torch.testing.assert_close(r["proj_multi"], r["proj_single"], rtol=1e-6, atol=1e-7)


def test_generation_and_evaluation_match_one_process(ranks):
    res, out = ranks
    for r in res:
        assert r["gen_multi"] == r["gen_single"]
        assert r["eval_multi"] == r["eval_single"]
        assert r["eval_cached"] == r["eval_single"]
    assert res[0]["gen_single"] == res[1]["gen_single"]
    assert res[0]["gen_multi"][1].startswith("Sure")
    # only rank 0 writes the cache file: one line per prompt, none twice
    lines = [json.loads(x) for x in (out / "gen.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["key"] for x in lines}) == len(res[0]["eval_single"])


def test_collectives_and_startup_errors(ranks):
    res, _ = ranks
    for rank, r in enumerate(res):
        assert r["gather_all"] == list(range(11))
        assert r["gather_dst"] == (list(range(5)) if rank == 0 else None)
        assert r["broadcast"] == "from rank 0"
        assert r["agree_mixed"] is False and r["agree_all"] is True
        assert r["sum"] == [2.0]
        assert r["micro_batches"] == [12 + rank, 14 + rank]
        assert "cannot share grad_accum=3" in r["grad_accum_error"]
        assert "rank 0: cpu, rank 1: meta" in r["device_error"]
