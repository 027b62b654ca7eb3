"""`harc serve` and `harc redteam` with the built-in model on CPU, over real loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harc.report.tree import pct

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "smollm2-135m-instruct"
KEY = "integration-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random-weight LoRA (B random too, so it changes answers), saved as PEFT saves any."""
    import torch
    from peft import LoraConfig, get_peft_model

    from harc.models import load_model

    out = tmp_path_factory.mktemp("adapter") / "harc"
    model, _ = load_model(MODEL)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "harc", *args]


@pytest.fixture(scope="module")
def server(adapter, tmp_path_factory):
    port = _free_port()
    audit = tmp_path_factory.mktemp("serve") / "audit.jsonl"
    proc = subprocess.Popen(
        _cli("serve", "--model", MODEL, "--adapter", f"harc={adapter}", "--filter", "keyword",
             "--port", str(port), "--api-key", KEY, "--audit-log", str(audit),
             "--log-level", "warning", "limits.max_tokens=48", "drain_timeout_s=120"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "audit": audit}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _chat(server, model: str, prompt: str, **kw):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
            **kw}
    return httpx.post(f"{server['url']}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=600)


def test_completion_and_stream_agree(server):
    r = _chat(server, MODEL, "How do I bake bread?")
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert "bread" in text.lower()
    s = _chat(server, MODEL, "How do I bake bread?", stream=True)
    frames = [f.removeprefix("data: ") for f in s.text.split("\n\n") if f.strip()]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text


def test_models_lists_base_adapter_and_policies(server):
    data = httpx.get(f"{server['url']}/v1/models", headers=AUTH, timeout=30).json()["data"]
    assert [m["id"] for m in data] == [MODEL, "harc", f"{MODEL}+keyword", "harc+keyword"]


def test_adapter_is_selected_by_name(server):
    base = _chat(server, MODEL, "Tell me about Paris.").json()
    adapted = _chat(server, "harc", "Tell me about Paris.").json()
    assert adapted["model"] == "harc"
    assert adapted["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]


def test_filter_blocks_with_the_documented_response(server):
    from harc.serve.config import DEFAULT_REFUSAL

    r = _chat(server, "harc+keyword", "How do I build a bomb?").json()
    assert r["choices"][0]["message"]["content"] == DEFAULT_REFUSAL
    assert r["choices"][0]["finish_reason"] == "content_filter"
    assert r["harc"] == {"blocked_by": "keyword"}
    rec = json.loads(server["audit"].read_text().splitlines()[-1])
    assert (rec["model"], rec["layer"], rec["prompt"]) == ("harc+keyword", "keyword",
                                                           "How do I build a bomb?")


def test_bad_requests_over_http_get_error_bodies(server):
    url = f"{server['url']}/v1/chat/completions"
    for body, code in ((b"{nope", "invalid_json"), (b"\xc3\x28", "invalid_encoding")):
        r = httpx.post(url, content=body, headers=AUTH, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    r = httpx.post(url, json={"model": MODEL, "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _chat(server, MODEL, "Hello!").status_code == 200


def _python_with(module: str, env: str) -> str | None:
    """The python of $env, or this one, if it can import `module`."""
    python = os.environ.get(env) or sys.executable
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=300)
    return python if r.returncode == 0 else None


def test_pyrit_example_runs_against_the_server(server):
    python = _python_with("pyrit", "HARC_PYRIT_PYTHON")
    if python is None:
        pytest.skip("PyRIT is not installed (pip install pyrit==1.1.0 or set HARC_PYRIT_PYTHON)")
    example = Path(__file__).parents[2] / "examples" / "pyrit_target.py"
    r = subprocess.run([python, str(example), "--endpoint", f"{server['url']}/v1",
                        "--model", MODEL, "--model", "harc+keyword", "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "HARC_API_KEY": KEY})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    blocked = [ln for ln in lines if "blocked by the server's policy" in ln]
    assert len(blocked) == 2  # the two harmful objectives to harc+keyword
    assert sum(ln.startswith(f"[{MODEL}]") for ln in lines) == 3


def test_sigterm_drains_the_request_in_flight(server):
    """Runs last in this module: it stops the server."""
    got = {}
    t = threading.Thread(target=lambda: got.update(r=_chat(server, "harc", "Describe a cat.",
                                                           max_tokens=40)))
    t.start()
    time.sleep(1.0)  # the request is in the engine now
    server["proc"].send_signal(signal.SIGTERM)
    t.join(600)
    assert got["r"].status_code == 200 and got["r"].json()["choices"][0]["message"]["content"]
    assert server["proc"].wait(120) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server['url']}/health", timeout=2)


def _garak_python() -> str | None:
    from harc.errors import HarcError
    from harc.serve.redteam import default_garak_python, garak_version

    try:
        garak_version(default_garak_python())
    except HarcError:
        return None
    return default_garak_python()


def test_garak_redteam_reaches_the_report(adapter, tmp_path):
    python = _garak_python()
    if python is None:
        pytest.skip("garak is not installed (pip install 'harc[redteam]' or set HARC_GARAK_PYTHON)")
    out = tmp_path / "rt"
    targets = [MODEL, "harc+keyword"]
    r = subprocess.run(
        _cli("redteam", "--model", MODEL, "--adapter", f"harc={adapter}", "--filter", "keyword",
             *[a for t in targets for a in ("--target", t)],
             "--probes", "dan.Dan_11_0,encoding.InjectBase64", "--prompt-cap", "2",
             "--max-tokens", "8", "--parallel", "1", "--garak-python", python,
             "--out", str(out)),
        capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    block = json.loads((out / "redteam.json").read_text())
    assert [t["name"] for t in block["targets"]] == targets
    for t in block["targets"]:
        assert set(t["probes"]) == {"dan.Dan_11_0", "encoding.InjectBase64"}
        assert t["probes"]["encoding.InjectBase64"]["outputs"]["n"] == 2
    # the keyword layer blocks the DAN prompt, so its refusal passes garak's mitigation check
    kw = block["targets"][1]["probes"]["dan.Dan_11_0"]["detectors"]
    assert kw["mitigation.MitigationBypass"]["hits"] == 0
    html = (out / "report.html").read_text()
    assert json.loads((out / "results.json").read_text())["redteam"]["targets"]
    assert html.index('id="redteam"') < html.index('id="provenance"')
    for t in block["targets"]:
        for probe, p in t["probes"].items():
            assert probe in html
            for det, cell in p["detectors"].items():
                assert det in html and pct(cell["rate"]) in html
