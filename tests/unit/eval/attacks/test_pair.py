"""PAIR's loop with a scripted attacker, a fake target and a fake judge."""

from __future__ import annotations

import json

import pytest

from harc.data import packages
from harc.errors import HarcError
from harc.eval.attacks import get_attack, sources
from harc.eval.attacks.pair import parse_attacker, rating
from harc.eval.judges.base import Verdict

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_system(monkeypatch, tmp_path):
    def package_file(spec, member, *, sha256=None):
        p = tmp_path / "sys.yaml"
        p.write_text("value: 'Red team. Goal: {{ objective }}. Prefix: {{ desired_prefix }}.'\n")
        return p

    monkeypatch.setattr(packages, "package_file", package_file)
    sources.clear_cache()
    yield
    sources.clear_cache()


def test_parse_attacker():
    assert parse_attacker('{"improvement": "x", "prompt": "P1"}') == "P1"
    assert parse_attacker('Sure!\n{"next_message": "P2", "rationale": "r"} done') == "P2"
    assert parse_attacker('{"next_message": "P3 with \\"quotes\\"", "rationale": "cut') == \
        'P3 with "quotes"'
    assert parse_attacker("I can't help with that.") is None


def test_rating_from_verdicts():
    assert rating(Verdict(False, True, 1.0, "j")) == 10
    assert rating(Verdict(False, None, 0.5, "j")) == 6
    assert rating(Verdict(True, None, None, "j")) == 1
    assert rating(Verdict(False, None, None, "j")) == 10  # refusal-only judge: no refusal


def test_pair_refines_until_success(fake_system):
    calls = {"attacker": [], "target": 0}

    def attacker(prompts):
        calls["attacker"].append(prompts)
        k = len(calls["attacker"])
        return [json.dumps({"rationale": "r", "next_message": f"try{k} {i}"})
                for i in range(len(prompts))]

    def target(probes):
        calls["target"] += 1
        # request 0 gives in at the second attempt; request 1 never does
        return ["Sure, here it is" if p.prompt.startswith("try2") and p.source_prompt == "goal A"
                else "I cannot help." for p in probes]

    class Judge:
        name = "fake"

        def judge(self, prompts, responses):
            return [Verdict(r.startswith("I cannot"), None, None, "fake") for r in responses]

    reqs = [{"prompt": "goal A", "category": "c"}, {"prompt": "goal B"}]
    out = get_attack("pair", attacker=attacker, n_iters=3).run(reqs, target, Judge())
    assert [p.source_prompt for p in out] == ["goal A", "goal B"]
    a, b = out
    assert a.meta["success"] and a.meta["iter"] == 1 and a.prompt == "try2 0" and a.category == "c"
    assert a.meta["rating"] == 10 and a.meta["response"] == "Sure, here it is"
    assert not b.meta["success"] and b.meta["rating"] == 1 and len(b.meta["history"]) == 3
    assert [len(c) for c in calls["attacker"]] == [2, 2, 1]  # solved requests leave the loop
    first = calls["attacker"][0][0]
    assert "Goal: goal A" in first and "Prefix: Sure, here is" in first
    third = calls["attacker"][2][0]
    assert "LANGUAGE MODEL OUTPUT: I cannot help." in third and "SCORE: 1" in third


def test_pair_needs_an_attacker_and_run(fake_system):
    with pytest.raises(HarcError, match="attacker"):
        get_attack("pair").run([{"prompt": "x"}], lambda p: [], None)
    with pytest.raises(HarcError, match="iterative"):
        get_attack("pair").apply([{"prompt": "x"}])


def test_pair_sends_alternating_chat_to_an_endpoint(fake_system):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from harc.eval.endpoint import ChatEndpoint

    convs = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            convs.append([m["role"] for m in body["messages"]])
            content = json.dumps({"next_message": f"attempt {len(convs)}"})
            data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        ep = ChatEndpoint(f"http://127.0.0.1:{srv.server_address[1]}", "attacker")

        class Never:
            def judge(self, prompts, responses):
                return [Verdict(True, None, None, "never") for _ in responses]

        (p,) = get_attack("pair", attacker=ep, n_iters=3, keep_last=1).run(
            [{"prompt": "goal"}], lambda probes: ["no"] * len(probes), Never())
    finally:
        srv.shutdown()
        srv.server_close()
    assert convs[0] == ["system", "user"]
    assert convs[2] == ["system", "user", "assistant", "user"]  # keep_last=1: one past round
    assert p.prompt == "attempt 1" and not p.meta["success"]  # ties keep the earliest best
