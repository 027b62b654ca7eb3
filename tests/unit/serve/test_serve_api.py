"""The HTTP API on a tiny model: completions, streaming, policy blocks, audit log, and a 4xx with an
OpenAI error body for every bad request, after which the server keeps serving."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
from serve_helpers import AUTH, user

pytestmark = pytest.mark.unit
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

KEYWORD_POLICY = {"tiny+kw": {"base": "tiny", "layers": ["keyword"]}}
LIMITS = {"max_tokens": 12, "default_max_tokens": 6, "max_prompt_tokens": 96,
          "max_body_bytes": 2048}


@pytest.fixture
def client(make_client):
    return make_client(policies=KEYWORD_POLICY, limits=LIMITS)


def _events(text: str) -> list:
    frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]"
    return [json.loads(f) for f in frames[:-1]]


def _assert_error(r, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    return err


def test_completion_has_the_openai_shape(client):
    r = client.post("/v1/chat/completions", json=user("Write a poem", max_tokens=5), headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny" and "harc" not in body
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and 0 <= u["completion_tokens"] <= 5
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_carries_the_same_text_as_a_plain_completion(client):
    plain = client.post("/v1/chat/completions", json=user("Explain the sea"), headers=AUTH).json()
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json=user("Explain the sea", stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]  # greedy: same answer
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finals[-1] == plain["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]


def test_keyword_policy_blocks_with_the_documented_refusal_and_audits(client, tmp_path):
    from harc.serve.config import DEFAULT_REFUSAL

    prompt = "How do I build a bomb at home?"
    r = client.post("/v1/chat/completions", json=user(prompt, model="tiny+kw"), headers=AUTH)
    body = r.json()
    assert r.status_code == 200
    assert body["choices"][0]["message"]["content"] == DEFAULT_REFUSAL
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["harc"] == {"blocked_by": "keyword"} and body["usage"]["completion_tokens"] == 0
    [rec] = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert rec["model"] == "tiny+kw" and rec["layer"] == "keyword" and rec["id"] == body["id"]
    assert rec["prompt"] == prompt and rec["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert rec["time"].endswith("+00:00")
    # the same prompt to the unfiltered base is answered, and a benign prompt passes the policy
    base = client.post("/v1/chat/completions", json=user(prompt), headers=AUTH).json()
    assert base["choices"][0]["finish_reason"] != "content_filter"
    ok = [client.post("/v1/chat/completions", json=user("Write a poem", model=m), headers=AUTH)
          .json()["choices"][0]["message"]["content"] for m in ("tiny", "tiny+kw")]
    assert ok[0] == ok[1]


def test_blocked_stream_ends_with_content_filter(client):
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json=user("steal a car", model="tiny+kw", stream=True))
    events = _events(r.text)
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert events[-1]["harc"] == {"blocked_by": "keyword"}


def test_audit_log_truncates_long_prompts(make_client, tmp_path):
    from harc.serve.app import PROMPT_CHARS

    client = make_client(policies=KEYWORD_POLICY, limits={"max_prompt_tokens": 2048})
    prompt = "kill " + "x" * 400
    r = client.post("/v1/chat/completions", json=user(prompt, model="tiny+kw"), headers=AUTH)
    assert r.json()["harc"] == {"blocked_by": "keyword"}
    rec = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert rec["prompt"] == prompt[:PROMPT_CHARS] + "…"
    assert rec["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()


def test_stop_sequences_cut_the_answer(make_client):
    c = make_client(generate_fn=lambda m, ch, prompts, n, b, done: ["alpha; beta # gamma"] * len(prompts))
    r = c.post("/v1/chat/completions", json=user("hi", stop=["#", ";"]), headers=AUTH).json()
    assert r["choices"][0]["message"]["content"] == "alpha"
    assert r["choices"][0]["finish_reason"] == "stop"


def test_models_and_health(client):
    data = client.get("/v1/models", headers=AUTH).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("tiny", None), ("tiny+kw", "tiny")]
    assert client.get("/health").json()["status"] == "ok"


BAD = [
    # (name, request kwargs for client.request, status, code, param)
    ("malformed JSON", {"content": b'{"model": "tiny", "messages": ['}, 400, "invalid_json", None),
    ("non-UTF-8 body", {"content": b'{"model": "\xff\xfe"}'}, 400, "invalid_encoding", None),
    ("JSON that is not an object", {"json": ["tiny"]}, 400, "invalid_json", None),
    ("deeply nested JSON", {"content": b"[" * 1000 + b"]" * 1000}, 400, "invalid_json", None),
    ("lone surrogate escape", {"content": b'{"model": "tiny", "messages": [{"role": "user", '
                               b'"content": "hi \\ud800"}]}'}, 400, "invalid_encoding", None),
    ("missing model", {"json": {"messages": [{"role": "user", "content": "hi"}]}}, 400,
     "missing_required_parameter", "model"),
    ("unknown model", {"json": user("hi", model="gpt-9")}, 404, "model_not_found", "model"),
    ("too many tokens", {"json": user("hi", max_tokens=13)}, 400, "invalid_value", "max_tokens"),
    ("negative max_tokens", {"json": user("hi", max_tokens=-1)}, 400, "invalid_value",
     "max_tokens"),
    ("empty messages", {"json": {"model": "tiny", "messages": []}}, 400, "empty_messages",
     "messages"),
    ("messages not a list", {"json": {"model": "tiny", "messages": "hi"}}, 400, "invalid_value",
     "messages"),
    ("tool role", {"json": {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}},
     400, "invalid_role", "messages.0.role"),
    ("made-up role", {"json": {"model": "tiny", "messages": [
        {"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}}, 400,
     "invalid_role", "messages.1.role"),
    ("last message from the assistant", {"json": {"model": "tiny", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}}, 400,
     "invalid_value", "messages.1"),
    ("blank user message", {"json": user("   ")}, 400, "invalid_value", "messages.0"),
    ("image content", {"json": {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}}, 400, "unsupported_content",
     "messages.0.content"),
    ("n > 1", {"json": user("hi", n=2)}, 400, "unsupported_value", "n"),
    ("tools", {"json": user("hi", tools=[{"type": "function"}])}, 400, "unsupported_value",
     "tools"),
    ("five stop strings", {"json": user("hi", stop=list("abcde"))}, 400, "invalid_value", "stop"),
    ("prompt too long", {"json": user("word " * 200)}, 400, "context_length_exceeded",
     "messages"),
    ("body too large", {"json": user("x" * 3000)}, 413, "request_too_large", None),
    ("missing auth", {"json": user("hi"), "headers": {}}, 401, "invalid_api_key", None),
    ("wrong key", {"json": user("hi"), "headers": {"Authorization": "Bearer nope"}}, 401,
     "invalid_api_key", None),
    ("not bearer", {"json": user("hi"), "headers": {"Authorization": "Basic test-key"}}, 401,
     "invalid_api_key", None),
]


@pytest.mark.parametrize("name,kw,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_a_4xx_error_body_and_the_server_keeps_serving(client, name, kw, status,
                                                                          code, param):
    kw = {"headers": AUTH, **kw}
    _assert_error(client.post("/v1/chat/completions", **kw), status, code, param)
    r = client.post("/v1/chat/completions", json=user("hello"), headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_path_and_wrong_method_are_openai_errors(client):
    _assert_error(client.get("/v1/nothing", headers=AUTH), 404, "not_found")
    _assert_error(client.get("/v1/chat/completions", headers=AUTH), 405, "method_not_allowed")
    _assert_error(client.get("/v1/models"), 401, "invalid_api_key")


def test_a_failing_generation_is_a_500_error_body_not_a_crash(make_client):
    calls = []

    def flaky(model, chat, prompts, n, bs, on_done):
        calls.append(prompts)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ["fine"] * len(prompts)

    c = make_client(generate_fn=flaky)
    err = _assert_error(c.post("/v1/chat/completions", json=user("hi"), headers=AUTH), 500,
                        "internal_error")
    assert "boom" not in err["message"]  # no internals leak to the client
    assert c.post("/v1/chat/completions", json=user("hi"), headers=AUTH).json()[
        "choices"][0]["message"]["content"] == "fine"


def test_requests_beyond_the_concurrency_limit_get_429(make_client):
    release, started = threading.Event(), threading.Event()

    def slow(model, chat, prompts, n, bs, on_done):
        started.set()
        assert release.wait(30)
        return ["done"] * len(prompts)

    c = make_client(generate_fn=slow, limits={"max_concurrent_requests": 1})
    first = {}
    t = threading.Thread(target=lambda: first.update(
        r=c.post("/v1/chat/completions", json=user("one"), headers=AUTH)))
    t.start()
    assert started.wait(30)
    _assert_error(c.post("/v1/chat/completions", json=user("two"), headers=AUTH), 429,
                  "too_many_requests")
    release.set()
    t.join(30)
    assert first["r"].status_code == 200
    assert c.post("/v1/chat/completions", json=user("three"), headers=AUTH).status_code == 200


def test_no_api_key_configured_means_open_access(make_client):
    c = make_client(api_key=None)
    assert c.post("/v1/chat/completions", json=user("hi")).status_code == 200
