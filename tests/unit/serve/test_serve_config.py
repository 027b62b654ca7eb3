"""ServeConfig from YAML, overrides and options (harc.config's build and apply_overrides); every
mistake is a one-line HarcError."""

from __future__ import annotations

from pathlib import Path

import pytest

from harc.config import build, to_dict
from harc.errors import HarcError
from harc.serve.config import ServeConfig, is_loopback, load_serve_config
from harc.serve.server import bind, check_exposure, resolve_api_key

pytestmark = pytest.mark.unit

YAML = """
model: smollm2-135m-instruct
adapters: {harc: runs/smollm2_135m/adapter}
policies:
  harc+keyword:
    base: harc
    layers: [keyword]
limits: {max_tokens: 64, default_max_tokens: 32}
audit_log: runs/serve/audit.jsonl
"""


def _load(tmp_path, text, overrides=(), **fields):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return load_serve_config(path, overrides, **fields)


def test_yaml_overrides_and_options(tmp_path):
    cfg = _load(tmp_path, YAML, ["limits.max_tokens=128", "batching.wait_ms=5"], port=9001)
    assert cfg.served_names() == ["smollm2-135m-instruct", "harc", "harc+keyword"]
    assert cfg.adapter_of("harc+keyword") == "harc" and cfg.adapter_of(cfg.base_name) is None
    assert cfg.limits.max_tokens == 128 and cfg.batching.wait_ms == 5 and cfg.port == 9001
    assert cfg.host == "127.0.0.1"  # loopback unless asked otherwise
    assert ServeConfig(limits={"max_tokens": 16}).limits.default_max_tokens == 16  # follows the cap
    assert _load(tmp_path, "serve:\n  model: x/y\n").model == "x/y"  # a serve: section works too


@pytest.mark.parametrize("text,overrides,needle", [
    (YAML + "colour: blue\n", (), "unknown config key 'colour'"),
    (YAML, ["limits.max_tokenz=3"], "did you mean 'limits.max_tokens'"),
    (YAML, ["limits.max_tokens=0"], "limits.max_tokens"),
    (YAML, ["limits.default_max_tokens=100"], "'limits.default_max_tokens': must lie in [1, "),
    (YAML, ["policies.p={base: nobody, layers: [keyword]}"], "neither the base model"),
    (YAML, ["policies.p={base: harc, layers: []}"], "policies.p.layers"),
    (YAML, ["policies.p={base: harc, layers: [magic]}"],
     "'policies.p.layers.0': unknown filter 'magic'"),
    (YAML, ["policies.p={base: harc, layers: [{name: keyword, keywordz: [a]}]}"],
     "'policies.p.layers.0': unknown filter 'keyword' option 'keywordz'"),
    (YAML, ["policies.p={base: harc, layers: [latent]}"], "reads directions; set directions:"),
    (YAML, ["policies.p={base: harc, layers: [{name: latent, layer: -1, directions: d}]}"],
     "layer"),
    (YAML, ["adapters.harc+keyword=x"], "unique"),
    (YAML, ["adapters.my.adapter=x"], "adapters"),
    (YAML, ["adapters.lora=x"], "'lora_' prefix"),
    (YAML, ["port=70000"], "port"),
    (YAML, ["nonsense"], "key=value"),
    ("[1, 2]", (), "must hold a mapping"),
    ("serve: 3", (), "serve: section must hold a mapping"),
    ("a: [", (), "not valid YAML"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, text, overrides, needle):
    with pytest.raises(HarcError) as e:
        _load(tmp_path, text, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_layers_are_filter_plugins_with_options_and_directions(tmp_path):
    cfg = _load(tmp_path, YAML, [
        "policies.p={base: harc, directions: d.safetensors, layer: 3, layers: [keyword, "
        "{name: latent, threshold: 0.2, layer: 5}, {name: latent, directions: e.safetensors}]}"])
    p = cfg.policies["p"]
    assert [(s.name, s.options) for s in p.layers] == [
        ("keyword", {}), ("latent", {"threshold": 0.2}), ("latent", {})]
    assert build(ServeConfig, to_dict(cfg)) == cfg  # the resolved config reads back
    ctx = [p.context(s) for s in p.layers]  # each setting falls back to the policy's
    assert [(c.directions, c.layer, c.heldout) for c in ctx] == [
        (Path("d.safetensors"), 3, None), (Path("d.safetensors"), 5, None),
        (Path("e.safetensors"), 3, None)]


def test_missing_config_file(tmp_path):
    with pytest.raises(HarcError, match="config file not found"):
        load_serve_config(tmp_path / "nope.yaml")


def test_command_line_adapters_and_filters_make_policies(tmp_path):
    cfg = load_serve_config(None, ["adapters.v3=/c"], model="m",
                            adapters=["harc=/a", str(tmp_path / "v2")], filters=["keyword"])
    assert dict(cfg.adapters) == {"harc": Path("/a"), "v2": tmp_path / "v2", "v3": Path("/c")}
    assert cfg.served_names() == ["m", "harc", "v2", "v3", "m+keyword", "harc+keyword",
                                  "v2+keyword", "v3+keyword"]
    assert cfg.policies["v2+keyword"].base == "v2"
    assert [s.name for s in cfg.policies["v2+keyword"].layers] == ["keyword"]
    latent = load_serve_config(None, filters=["latent"], directions=tmp_path / "d.safetensors")
    assert latent.policies["smollm2-135m-instruct+latent"].directions == tmp_path / "d.safetensors"
    with pytest.raises(HarcError, match="needs --directions"):
        load_serve_config(None, filters=["latent"])
    with pytest.raises(HarcError, match="unknown filter 'regex'"):
        load_serve_config(None, filters=["regex"])


def test_api_key_sources_and_exposure(monkeypatch):

    cfg = ServeConfig(api_key_env="HARC_TEST_KEY")
    monkeypatch.setenv("HARC_TEST_KEY", "s3cret")
    assert resolve_api_key(cfg, None) == "s3cret" and resolve_api_key(cfg, "cli") == "cli"
    monkeypatch.setenv("HARC_TEST_KEY", "")
    with pytest.raises(HarcError, match="HARC_TEST_KEY"):
        resolve_api_key(cfg, None)
    assert resolve_api_key(ServeConfig(), None) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(HarcError, match="exposes the model"):
        check_exposure(ServeConfig(host="0.0.0.0"), None)
    check_exposure(ServeConfig(host="0.0.0.0"), "key")  # a key makes it the operator's choice


def test_taken_port_is_a_one_line_error():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(HarcError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
