"""`harc run` end to end on a tiny random model saved to disk, with local data files only."""

import json

import pytest

from harc.pipeline import load_run_config, run_pipeline

pytestmark = pytest.mark.integration

def test_run_pipeline_end_to_end_then_resumes_without_redoing_stages(run_config):
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

    stamps = {p: p.stat().st_mtime for p in out.rglob("stage.json")}
    run_pipeline(load_run_config(path, [f"output_dir={out}"]), log=lambda m: None)
    assert {p: p.stat().st_mtime for p in out.rglob("stage.json")} == stamps
