"""Running the app under uvicorn: in the foreground (`harc serve`, draining on SIGINT/SIGTERM) or on
a background thread at a free loopback port (`harc redteam`, tests, the load benchmark)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

from harc.errors import HarcError
from harc.serve.config import ServeConfig, is_loopback


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is a one-line error (uvicorn would
    exit the process) and port 0 gives a free port whose number we know."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HarcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def resolve_api_key(cfg: ServeConfig, api_key: str | None) -> str | None:
    """The key given on the command line, else the one in `cfg.api_key_env`, else None (open)."""
    if api_key:
        return api_key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "")
        if not key:
            raise HarcError(f"api_key_env names {cfg.api_key_env}, which is empty or unset")
        return key
    return None


def check_exposure(cfg: ServeConfig, api_key: str | None) -> None:
    if not is_loopback(cfg.host) and not api_key:
        raise HarcError(f"serving on {cfg.host} exposes the model beyond this machine; give an "
                        "API key (--api-key or api_key_env) or keep host 127.0.0.1")


def _uvicorn(app, cfg: ServeConfig, log_level: str):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=log_level == "info",
                                         timeout_graceful_shutdown=cfg.drain_timeout_s))


def serve_forever(app, cfg: ServeConfig, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then drain: no new connections, in-flight requests finish
    (up to drain_timeout_s), queued jobs run, and the process exits 0."""
    server = _uvicorn(app, cfg, log_level)

    def stop(*_):
        raise SystemExit(0)

    # uvicorn handles the signals while it runs and re-raises them once drained; these handlers
    # turn that re-raise into a clean exit.
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sock.close()


@contextlib.contextmanager
def background_server(app, cfg: ServeConfig, *, host: str = "127.0.0.1",
                      startup_timeout: float = 120.0) -> Iterator[str]:
    """Serve `app` on a free port of `host` from a thread; yields the base URL (…/v1)."""
    sock = bind(host, 0)
    port = sock.getsockname()[1]
    server = _uvicorn(app, cfg, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="harc-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise HarcError("the background server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(cfg.drain_timeout_s + 10)
        sock.close()
        logging.getLogger("harc.serve").debug("background server on port %d stopped", port)
