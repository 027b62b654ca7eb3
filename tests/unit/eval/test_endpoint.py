"""The OpenAI-compatible client against a stub server on 127.0.0.1, and an unreachable port."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harc.errors import HarcError
from harc.eval.endpoint import ChatEndpoint

pytestmark = pytest.mark.unit


class _Stub(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802  (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, self.headers.get("Authorization"), body))
        user = body["messages"][-1]["content"]
        if user == "fail":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad request"}')
            return
        out = {"choices": [{"message": {"role": "assistant", "content": f"echo: {user}"}}]}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Stub.seen.clear()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_chat_completions_round_trip(server):
    ep = ChatEndpoint(server, "tiny", api_key="k", system="be terse", concurrency=2)
    assert ep(["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]  # order kept under threads
    path, auth, body = _Stub.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "tiny" and body["messages"][0] == {"role": "system", "content": "be terse"}
    assert body["temperature"] == 0.0 and body["max_tokens"] == 512


def test_http_error_is_one_line(server):
    with pytest.raises(HarcError, match="HTTP 400") as e:
        ChatEndpoint(server, "tiny").complete("fail")
    assert "\n" not in str(e.value)


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HarcError, match="cannot reach") as e:
        ChatEndpoint(f"http://127.0.0.1:{port}/v1", "m", timeout=2)(["hi"])
    assert "\n" not in str(e.value)


def test_bad_url():
    with pytest.raises(HarcError, match="http"):
        ChatEndpoint("127.0.0.1:8000", "m")
