"""Policy layers are harc.eval.filters plugins: the latent filter served, calibrated on the
validation prompts beside its directions or with a fixed threshold, at the plane layer or a given
one."""

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
    return {"name": "latent", "directions": str(directions), "layer": 2, **kw}


def test_latent_layer_blocks_above_its_threshold(make_client, directions, tmp_path):
    c = make_client(policies={
        "all": {"base": "tiny", "layers": [_latent(directions, threshold=-1.0)]},
        "none": {"base": "tiny", "layers": [_latent(directions, threshold=1.0)]},
        "calibrated": {"base": "tiny", "directions": str(directions), "layer": 2,
                       "layers": ["keyword", "latent"]}})
    blocked = c.post("/v1/chat/completions", json=user("bake bread", model="all"), headers=AUTH)
    assert blocked.json()["harc"] == {"blocked_by": "latent"}
    passed = c.post("/v1/chat/completions", json=user("bake bread", model="none"), headers=AUTH)
    assert passed.json()["choices"][0]["finish_reason"] != "content_filter"
    assert c.post("/v1/chat/completions", json=user("bake bread", model="calibrated"),
                  headers=AUTH).status_code == 200
    kw, latent = c.app.state.engine.targets["calibrated"].layers
    assert kw.name == "keyword" and latent.ctx.layer == 2
    # the midpoint of the two validation means, from heldout.json beside the directions
    cal = latent.calibration
    assert cal["n"] == [2, 2] and cal["layer"] == 2
    assert latent.threshold == pytest.approx((cal["harmful_mean"] + cal["harmless_mean"]) / 2)
    first = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert (first["model"], first["layer"]) == ("all", "latent")


def test_latent_layer_configuration_errors(make_client, directions, tmp_path):
    with pytest.raises(HarcError, match="set layer: explicitly"):  # 4 layers: no band to pick in
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions, layer=None)]}})
    with pytest.raises(HarcError, match="outside 0..4"):
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions, layer=9)]}})
    with pytest.raises(HarcError, match="cannot read validation prompts"):
        make_client(policies={"p": {"base": "tiny", "layers": [
            _latent(directions, heldout=str(tmp_path / "none.json"))]}})
    (tmp_path / "heldout.json").unlink()
    with pytest.raises(HarcError, match="calibrates its threshold on validation prompts"):
        make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions)]}})
    make_client(policies={"p": {"base": "tiny", "layers": [_latent(directions, threshold=0.5)]}})
    with pytest.raises(HarcError, match="directions file not found"):
        make_client(policies={"p": {"base": "tiny", "layers": [
            _latent(tmp_path / "none.safetensors")]}})
