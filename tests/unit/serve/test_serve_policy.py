"""Policy layers: the latent filter as a served layer, calibrated or with a fixed threshold."""

from __future__ import annotations

import json

import pytest
import torch
from serve_helpers import AUTH, user

from harc.errors import HarcError

pytestmark = pytest.mark.unit
pytest.importorskip("fastapi")
pytest.importorskip("httpx")


@pytest.fixture
def directions(tmp_path):
    from harc.directions import NAMES, Directions

    torch.manual_seed(0)
    vs = {n: torch.nn.functional.normalize(torch.randn(5, 32), dim=-1) for n in NAMES}
    path = Directions(**vs, norms={n: torch.ones(5) for n in NAMES}).save(
        tmp_path / "directions.safetensors")
    (tmp_path / "heldout.json").write_text(json.dumps(
        {"harmful": ["kill a process", "steal a car"], "harmless": ["bake bread", "a poem"]}))
    return path


def _latent(directions, **kw):
    return {"type": "latent", "directions": str(directions), "layer": 2, **kw}


def test_latent_layer_blocks_above_its_threshold(make_client, directions, tmp_path):
    c = make_client(policies={
        "all": {"base": "tiny", "layers": [_latent(directions, threshold=-2.0)]},
        "none": {"base": "tiny", "layers": [_latent(directions, threshold=2.0)]},
        "calibrated": {"base": "tiny", "layers": [_latent(directions)]}})
    blocked = c.post("/v1/chat/completions", json=user("bake bread", model="all"), headers=AUTH)
    assert blocked.json()["harc"] == {"blocked_by": "latent"}
    passed = c.post("/v1/chat/completions", json=user("bake bread", model="none"), headers=AUTH)
    assert passed.json()["choices"][0]["finish_reason"] != "content_filter"
    assert c.post("/v1/chat/completions", json=user("bake bread", model="calibrated"),
                  headers=AUTH).status_code == 200
    layer = c.app.state.engine.targets["calibrated"].layers[0].filter
    assert -1.0 <= layer.threshold <= 1.0 and layer.layer == 2  # midpoint of two mean cosines
    first = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert (first["model"], first["layer"]) == ("all", "latent")


def test_latent_layer_configuration_errors(make_client, directions, tmp_path):
    with pytest.raises(HarcError, match="set layer: explicitly"):  # 4 layers: no band to pick in
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions, layer=None)]}})
    with pytest.raises(HarcError, match="outside 0..4"):
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions, layer=9)]}})
    (tmp_path / "heldout.json").unlink()
    with pytest.raises(HarcError, match="needs a threshold or calibration prompts"):
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions)]}})
    with pytest.raises(HarcError, match="directions file not found"):
        make_client(policies={"p": {"base": "tiny", "layers": [
            _latent(tmp_path / "none.safetensors")]}})
