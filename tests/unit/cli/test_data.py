"""`harc data list / show / fetch` through typer's test runner (no network)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from harc.cli.data import app
from harc.errors import HarcError

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "data"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARC_OFFLINE", raising=False)
    monkeypatch.setenv("COLUMNS", "200")


def test_list_shows_entries_and_filters_by_kind():
    res = runner.invoke(app, ["list"])
    assert res.exit_code == 0, res.output
    for name in ("advbench", "harmbench", "harc-benign", "ultrachat"):
        assert name in res.output
    res = runner.invoke(app, ["list", "--kind", "triples"])
    assert "uncensorbench" in res.output and "advbench" not in res.output
    res = runner.invoke(app, ["list", "--kind", "nonsense"])
    assert isinstance(res.exception, HarcError)


def test_show_prints_metadata_and_first_records():
    res = runner.invoke(app, ["show", "harc-pseudo-harmful", "--rows", "2"])
    assert res.exit_code == 0, res.output
    assert "license" in res.output and "records: 150" in res.output
    assert res.output.count('{"prompt"') == 2
    res = runner.invoke(app, ["show", str(FIX / "pairs.csv")])
    assert res.exit_code == 0 and '"response": "The blue whale."' in res.output


def test_fetch_reports_each_set_and_fails_as_harc_error(monkeypatch):
    res = runner.invoke(app, ["fetch", "harc-capability", "harc-benign"])
    assert res.exit_code == 0, res.output
    assert "60" in res.output and "300" in res.output
    res = runner.invoke(app, ["fetch", "harc-benign", "no-such-set"])
    assert isinstance(res.exception, HarcError)
    assert "1 of 2 datasets failed" in str(res.exception)
    assert "300" in res.output  # the good one was still fetched and reported


def test_fetch_default_profile_offline_without_cache_names_the_fix(monkeypatch):
    monkeypatch.setenv("HARC_OFFLINE", "1")
    res = runner.invoke(app, ["fetch"])
    assert isinstance(res.exception, HarcError)
    msg = str(res.exception)
    assert "advbench" in msg and "harmbench" in msg and "harc data fetch" in msg
