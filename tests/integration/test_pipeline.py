"""`harc run` end to end on a tiny random model saved to disk, with local data files only."""

import json

import pytest
import yaml

from harc.cli import run as harc
from harc.pipeline import load_run_config, run_pipeline

pytestmark = pytest.mark.integration


def test_run_pipeline_end_to_end_then_resumes_without_redoing_stages(run_config, capsys):
    path, out = run_config
    rc = load_run_config(path, [f"output_dir={out}"])
    paths = run_pipeline(rc, log=lambda m: None)
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["base", "base+keyword", "harc", "harc+keyword"]
    base = results["runs"][0]
    assert set(base["attacks"]) == {"direct", "refusal_suppression", "prefill", "ablation"}
    assert base["attacks"]["direct"]["n"] == 4
    assert "kl_vs_base" in results["runs"][2]["capability"]
    assert results["geometry"]["after"]["selected_layers"]
    assert paths["html"].exists() and paths["md"].exists()
    adapter = out / "train" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "directions.safetensors").exists()
    card = (adapter / "README.md").read_text()
    assert "## Evaluation" in card and "triples.jsonl" in card
    ext = json.loads((out / "extract" / "stage.json").read_text())
    assert ext["prompts"]["harmful"].endswith("harmful.jsonl") and 1 <= ext["prompts"]["n"] <= 8
    assert ext["response_pairs"] == {"harmful": "synthesised", "harmless": "synthesised"}
    held = json.loads((out / "extract" / "heldout.json").read_text())
    assert held["harmful"] and held["harmless"]
    timings = results["timings_s"]
    assert all(timings[k] > 0 for k in ("synth", "extract", "diagnose", "eval_base", "train",
                                        "eval_harc", "geometry_after"))
    assert results["skipped_stages"] == []

    stamps = {p: p.stat().st_mtime for p in out.rglob("stage.json")}
    logged = []
    run_pipeline(load_run_config(path, [f"output_dir={out}"]), log=logged.append)
    assert {p: p.stat().st_mtime for p in out.rglob("stage.json")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert set(again["skipped_stages"]) == {
        "synth", "extract", "diagnose", "eval/base", "eval/base+keyword", "train", "eval/harc",
        "eval/harc+keyword", "geometry_after"}
    assert any("synth: skipped" in m for m in logged)
    for k in ("synth", "extract", "diagnose", "eval_base", "train", "eval_harc",
              "geometry_after"):  # the time the work took, not the time skipping it took
        assert again["timings_s"][k] == pytest.approx(timings[k], rel=0.05, abs=0.05), k

    # the latent filter of `harc eval` calibrates on the run's own held-out prompts
    cfg = yaml.safe_load(path.read_text())
    ev = {**cfg["eval"], "harmful": cfg["run"]["harmful_eval"], "attacks": ["direct"],
          "over_refusal": [cfg["run"]["harmful_eval"]], "benign": cfg["run"]["harmful_eval"],
          "capability": None, "plane": False, "latent_judge": False}
    (out / "e.yaml").write_text(yaml.safe_dump(ev))
    code = harc(["eval", "--model", cfg["model"], "--config", str(out / "e.yaml"), "--filter",
                 "latent", "--directions", str(out / "extract" / "directions.safetensors"),
                 "--k", "2", "--out", str(out / "latent_eval")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    names = [r["name"] for r in json.loads((out / "latent_eval" / "results.json").read_text())["runs"]]
    assert names == ["base", "base+latent"]
    assert all(len(ln) <= 80 for ln in cap.out.splitlines() if "/" not in ln)
