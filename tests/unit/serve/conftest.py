"""Tiny random-weight models behind the app, driven in-process (no sockets, no downloads)."""

from __future__ import annotations

import pytest
from serve_helpers import KEY
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def make_client(tmp_path):
    """make_client(model=None, **config) -> a started TestClient (lifespan run) for ServeConfig
    keys; the served base name is "tiny". Modules using it importorskip fastapi and httpx."""
    from fastapi.testclient import TestClient

    from harc.config import build
    from harc.serve.app import create_app
    from harc.serve.config import ServeConfig

    clients = []

    def make(model=None, *, generate_fn=None, api_key=KEY, **config):
        config.setdefault("model", "tiny")
        config.setdefault("audit_log", str(tmp_path / "audit.jsonl"))
        cfg = build(ServeConfig, config)
        kw = {"generate_fn": generate_fn} if generate_fn else {}
        app = create_app(cfg, model if model is not None else tiny_model(), tiny_tokenizer(),
                         api_key=api_key, **kw)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)
