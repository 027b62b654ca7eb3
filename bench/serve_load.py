"""Load test of `harc serve` on loopback: C concurrent clients x R requests, per served model.

    python bench/serve_load.py --out docs/bench/serve_load-cpu.json              # 50 x 10, CPU
    python bench/serve_load.py --clients 4 --requests 2 --max-tokens 4           # a quick check

Starts `python -m harc serve` on a free 127.0.0.1 port with the model, one adapter, the keyword
filter and the runtime latent guard, then runs four scenarios one after another: the base model,
the adapter, the adapter behind the keyword filter, and the adapter behind the latent guard (as a
server runs it: each finished answer scored teacher-forced; random unit directions and a fixed
threshold stand in for a run's, since the cost does not depend on their values). In each, C
clients send R chat completions back to back (benign prompts, so the filter passes them and its
cost is what changes). Every request's latency is kept;
a non-200 answer, a malformed body, a transport error or a timeout counts as failed. Without
--adapter a random-weight LoRA stands in for a HARC adapter: serving cost does not depend on the
values of the weights. The whole run is bounded by --timeout. JSON to --out, a table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPTS = [
    "How do I bake bread at home?", "Write a haiku about the sea.",
    "What is the capital of France?", "Give me three tips for a job interview.",
    "Explain photosynthesis to a child.", "How do I sort a list in Python?",
    "Suggest a name for a grey cat.", "What should I pack for a weekend hike?",
    "Summarise the plot of Romeo and Juliet.", "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_adapter(model: str, out: Path) -> tuple[Path, Path]:
    """A random LoRA and random unit directions for `model` (serving cost ignores their values)."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(SRC))
    from harc.directions import NAMES, Directions
    from harc.models import decoder_layers, load_model

    base, _ = load_model(model)
    torch.manual_seed(0)
    shape = (len(decoder_layers(base)) + 1, base.config.hidden_size)
    vs = {n: torch.nn.functional.normalize(torch.randn(shape), dim=-1) for n in NAMES}
    dirs = Directions(**vs, norms={n: torch.ones(shape[0]) for n in NAMES})
    directions = dirs.save(out.parent / "directions.safetensors")
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out)
    return out, directions


def _start_server(args, adapter: Path, directions: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "harc", "serve", "--model", args.model,
           "--adapter", f"harc={adapter}", "--filter", "keyword", "--port", str(port),
           "--log-level", "warning", f"limits.max_tokens={args.max_tokens}",
           f"limits.max_concurrent_requests={max(64, args.clients)}",
           f"batching.max_batch_size={args.batch_size}", f"batching.wait_ms={args.wait_ms}",
           "policies.harc+latent_guard.base=harc", f"policies.harc+latent_guard.directions={directions}",
           "policies.harc+latent_guard.layers=[{name: latent_guard, threshold: 0.5}]"]
    if args.threads:
        cmd.append(f"threads={args.threads}")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_ready(proc: subprocess.Popen, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("server did not start in time")


async def _scenario(url: str, model: str, args, deadline: float) -> dict:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.request_timeout) as c:
        async def one(i: int) -> dict:
            body = {"model": model, "max_tokens": args.max_tokens,
                    "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/chat/completions", json=body)
                data = r.json()
                ok = r.status_code == 200 and isinstance(data["choices"][0]["message"]["content"],
                                                         str)
                return {"s": time.perf_counter() - t0, "ok": ok, "status": r.status_code,
                        "tokens": data.get("usage", {}).get("completion_tokens", 0) if ok else 0,
                        "blocked": ok and data["choices"][0]["finish_reason"] == "content_filter"}
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                return {"s": time.perf_counter() - t0, "ok": False, "status": type(e).__name__,
                        "tokens": 0, "blocked": False}

        await one(0)  # warm-up, not counted
        before = (await c.get("/health")).json()["batches"]

        async def client(k: int) -> list[dict]:
            return [await one(k * args.requests + j) for j in range(args.requests)]

        t0 = time.perf_counter()
        left = max(1.0, deadline - time.monotonic())
        runs = await asyncio.wait_for(asyncio.gather(*[client(k) for k in range(args.clients)]),
                                      timeout=left)
        wall = time.perf_counter() - t0
        batches = (await c.get("/health")).json()["batches"] - before
    recs = [r for rs in runs for r in rs]
    lat = sorted(r["s"] for r in recs if r["ok"])
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    failed = [r["status"] for r in recs if not r["ok"]]
    return {"model": model, "requests": len(recs), "ok": len(lat), "failed": len(failed),
            "failures": sorted({str(f) for f in failed}), "blocked": sum(r["blocked"] for r in recs),
            "p50_s": round(q[49], 3), "p95_s": round(q[94], 3), "max_s": round(lat[-1], 3),
            "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 3),
            "completion_tokens_per_s": round(sum(r["tokens"] for r in recs) / wall, 1),
            "generate_calls": batches,
            "mean_batch": round(len(recs) / batches, 2) if batches else None}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", type=Path, help="adapter folder (default: a random LoRA)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="server batching.max_batch_size")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="server batching.wait_ms")
    ap.add_argument("--threads", type=int, help="server torch threads (default: torch's)")
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="bound on the whole run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    deadline = time.monotonic() + args.timeout
    load_before = os.getloadavg()[0]  # on a shared machine, how busy the CPU already was
    tmp = tempfile.TemporaryDirectory(prefix="serve_load.")
    adapter, directions = _random_adapter(args.model, Path(tmp.name) / "adapter")
    adapter = args.adapter or adapter
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(args, adapter, directions, port)
    try:
        _wait_ready(proc, url, deadline)
        scenarios = []
        for m in (args.model, "harc", "harc+keyword", "harc+latent_guard"):
            scenarios.append(asyncio.run(_scenario(url, m, args, deadline)))
            print(f"{m}: {scenarios[-1]['wall_s']} s", file=sys.stderr, flush=True)
    except TimeoutError:
        sys.exit(f"the run exceeded --timeout {args.timeout:g} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        tmp.cleanup()
    import torch
    import transformers

    result = {"bench": "serve_load", "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "device": "cpu",
                          "load_average_1min": [round(load_before, 2),
                                                round(os.getloadavg()[0], 2)],
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k != "out"} | {"adapter": str(args.adapter or "random LoRA r16")},
              "scenarios": scenarios}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    cols = ("model", "requests", "ok", "failed", "blocked", "p50_s", "p95_s", "max_s", "wall_s",
            "requests_per_s", "completion_tokens_per_s", "mean_batch")
    print(" | ".join(cols))
    for s in scenarios:
        print(" | ".join(str(s[c]) for c in cols))
    if any(s["failed"] for s in scenarios):
        sys.exit(1)


if __name__ == "__main__":
    main()
