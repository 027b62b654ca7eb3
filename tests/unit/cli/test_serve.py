"""`harc serve` and `harc redteam` on the command line: help, and bad input as one line before
any model loads (the commands themselves run in tests/integration/test_serve.py)."""

import importlib.util
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from harc.cli import app
from harc.errors import HarcError

pytestmark = pytest.mark.unit
runner = CliRunner()


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_both_commands_are_mounted_with_their_options():
    res = runner.invoke(app, ["--help"])
    assert "serve" in res.output and "redteam" in res.output
    res = runner.invoke(app, ["serve", "--help"])
    assert res.exit_code == 0, res.output
    for text in ("OpenAI-compatible", "--adapter", "NAME=FOLDER", "--filter", "keyword, latent",
                 "--directions", "--api-key", "--audit-log", "overrides"):
        assert text in res.output, text
    res = runner.invoke(app, ["redteam", "--help"])
    assert res.exit_code == 0, res.output
    for text in ("garak", "--probes", "encoding probe", "--target",
                 "--garak-python", "--results"):
        assert text in res.output, text


@pytest.mark.parametrize("args,needle", [
    (["serve", "limits.max_tokenz=3"], "did you mean 'limits.max_tokens'"),
    (["serve", "--filter", "latent"], "needs --directions"),
    (["redteam", "--adapter", "lora=/x"], "'lora_' prefix"),
])
def test_bad_input_is_a_harc_error_before_loading(args, needle):
    res = runner.invoke(app, args)
    assert isinstance(res.exception, HarcError) and needle in str(res.exception)


def test_without_the_serve_extra_the_command_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    res = runner.invoke(app, ["serve"])
    assert isinstance(res.exception, HarcError)
    assert str(res.exception) == "serving needs fastapi: pip install 'harc[serve]'"


def test_the_program_prints_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harc", "serve", "--config",
                        str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "config file not found" in r.stderr  # input error (docs/cli.md)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
