"""The run config: validated whole before a model loads; extraction sets from the config."""

import pytest

from harc.errors import HarcError
from harc.pipeline import load_run_config

pytestmark = pytest.mark.unit


def test_run_config_errors_name_the_key(run_config):
    path, out = run_config
    with pytest.raises(HarcError, match="eval"):
        load_run_config(path, ["eval.n_harmful=-1"])
    with pytest.raises(HarcError, match="nonsense"):
        load_run_config(path, ["run.nonsense=1"])
    with pytest.raises(HarcError, match="filter"):
        load_run_config(path, ["run.filters=[magic]"])


def test_extraction_sets_come_from_the_config_unless_run_overrides(run_config):
    path, out = run_config
    rc = load_run_config(path, [])
    assert rc.run.harmful.endswith("harmful.jsonl") and rc.run.n_extract == 8
    assert rc.run.harmless == "harc-benign"
    rc = load_run_config(path, ["run.harmful=advbench", "run.n_extract=5",
                                "data.extract_harmless=alpaca"])
    assert (rc.run.harmful, rc.run.n_extract, rc.run.harmless) == ("advbench", 5, "alpaca")
    with pytest.raises(HarcError, match="val_n"):
        load_run_config(path, ["data.val_n=0"])
