import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes caches under a temporary HARC_CACHE unless one is set."""
    import os

    if "HARC_CACHE" not in os.environ or os.environ.get("HARC_TEST_ISOLATE", "1") == "1":
        monkeypatch.setenv("HARC_CACHE", str(tmp_path_factory.getbasetemp() / "harc-cache"))
