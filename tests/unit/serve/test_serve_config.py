"""ServeConfig from YAML, overrides and options; every mistake is a one-line HarcError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harc.errors import HarcError

pytestmark = pytest.mark.unit
pytest.importorskip("pydantic")

YAML = """
model: smollm2-135m-instruct
adapters: {harc: runs/smollm2_135m/adapter}
policies:
  harc+keyword:
    base: harc
    layers: [{type: keyword}]
limits: {max_tokens: 64, default_max_tokens: 32}
audit_log: runs/serve/audit.jsonl
"""


def _load(tmp_path, text, overrides=None, **fields):
    from harc.serve.config import load_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return load_serve_config(path, overrides, **fields)


def test_yaml_overrides_and_options(tmp_path):
    from harc.serve.config import ServeConfig

    cfg = _load(tmp_path, YAML, ["limits.max_tokens=128", "batching.wait_ms=5"], port=9001)
    assert cfg.served_names() == ["smollm2-135m-instruct", "harc", "harc+keyword"]
    assert cfg.adapter_of("harc+keyword") == "harc" and cfg.adapter_of(cfg.base_name) is None
    assert cfg.limits.max_tokens == 128 and cfg.batching.wait_ms == 5 and cfg.port == 9001
    assert cfg.host == "127.0.0.1"  # loopback unless asked otherwise
    assert ServeConfig(limits={"max_tokens": 16}).limits.default_max_tokens == 16  # follows the cap
    assert _load(tmp_path, "serve:\n  model: x/y\n").model == "x/y"  # a serve: section works too


@pytest.mark.parametrize("text,overrides,needle", [
    (YAML + "colour: blue\n", None, "colour: Extra inputs are not permitted"),
    (YAML, ["limits.max_tokenz=3"], "limits.max_tokenz"),
    (YAML, ["limits.max_tokens=0"], "limits.max_tokens"),
    (YAML, ["limits.default_max_tokens=100"], "default_max_tokens must not exceed"),
    (YAML, ["policies.p={base: nobody, layers: [{type: keyword}]}"], "neither the base model"),
    (YAML, ["policies.p={base: harc, layers: []}"], "policies.p.layers"),
    (YAML, ["policies.p={base: harc, layers: [{type: magic}]}"], "policies.p.layers.0"),
    (YAML, ["adapters.harc+keyword=x"], "unique"),
    (YAML, ["adapters.my.adapter=x"], "adapters"),
    (YAML, ["adapters.lora=x"], "'lora_' prefix"),
    (YAML, ["port=70000"], "port"),
    (YAML, ["nonsense"], "key=value"),
    ("[1, 2]", None, "must hold a mapping"),
    ("a: [", None, "not readable YAML"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, text, overrides, needle):
    with pytest.raises(HarcError) as e:
        _load(tmp_path, text, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    from harc.serve.config import load_serve_config

    with pytest.raises(HarcError, match="serve config not found"):
        load_serve_config(tmp_path / "nope.yaml")


def test_command_line_adapters_and_filters_make_policies(tmp_path):
    from harc.serve.cli import build_config

    cfg = build_config(None, None, model="m", adapter=["harc=/a", str(tmp_path / "v2")],
                       input_filter=["keyword"])
    assert dict(cfg.adapters) == {"harc": Path("/a"), "v2": tmp_path / "v2"}
    assert cfg.served_names() == ["m", "harc", "v2", "m+keyword", "harc+keyword", "v2+keyword"]
    assert cfg.policies["v2+keyword"].base == "v2"
    with pytest.raises(HarcError, match="needs --directions"):
        build_config(None, None, input_filter=["latent"])
    with pytest.raises(HarcError, match="unknown filter"):
        build_config(None, None, input_filter=["regex"])


def test_api_key_sources_and_exposure(monkeypatch):
    from harc.serve.cli import resolve_api_key
    from harc.serve.config import ServeConfig, is_loopback
    from harc.serve.server import check_exposure

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
    from harc.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(HarcError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    pytest.importorskip("fastapi")
    r = subprocess.run([sys.executable, "-m", "harc.serve", "serve", "--config",
                        str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "serve config not found" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
