"""Latency of requests batched into one generate call: answered as each row finishes (generate's
`on_done`, what `harc serve`'s engine does) or all together when the call returns.

    python bench/serve_rows.py --threads 1 --out docs/bench/serve_rows-cpu.json

N chat requests (benign questions, rendered with the chat template) are queued together into the
server's engine, which runs them as one generate call; each request's latency is from queueing to
its answer. The two modes alternate within one process, so both see the same machine load, and
must return the same texts (greedy decoding). JSON to --out, a table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serve_load import PROMPTS as LOAD_PROMPTS  # noqa: E402

# The load test's 12 benign questions and 4 more: 16 rows, one full batch.
PROMPTS = [*LOAD_PROMPTS, "Name three primary colours.", "What is 17 times 3?",
           "Say hello in French.", "Describe a rainbow in one sentence."]


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from harc.config import build
    from harc.serve.config import ServeConfig
    from harc.serve.engine import Engine, load_served, run_generate
    from harc.serve.policy import build_targets

    cfg = build(ServeConfig, {"model": args.model, "threads": args.threads})
    model, tok = load_served(cfg)
    prompts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                       tokenize=False, add_generation_prompt=True)
               for i in range(args.requests)]
    modes = {"per row (on_done)": run_generate,
             "per call": lambda m, c, p, n, b, done: run_generate(m, c, p, n, b)}

    def once(generate_fn) -> tuple[list[float], list[str], float]:
        eng = Engine(model, tok, {}, max_batch_size=args.requests, wait_ms=200,
                     generate_fn=generate_fn)
        eng.targets = build_targets(cfg, model, None, eng.active)
        target = eng.targets[cfg.base_name]

        async def run():
            t0 = time.perf_counter()
            futs = [eng.enqueue(target, p, p, args.max_tokens, []) for p in prompts]
            lat = [0.0] * len(futs)

            async def wait(i):
                out = await futs[i]
                lat[i] = time.perf_counter() - t0
                return out

            outs = await asyncio.gather(*(wait(i) for i in range(len(futs))))
            return lat, [o.text for o in outs], [o.completion_tokens for o in outs]

        eng.start()
        try:
            lat, texts, tokens = asyncio.run(run())
        finally:
            eng.close(60)
        assert eng.batches == 1, "the requests did not share one generate call"
        return lat, texts, tokens

    once(run_generate)  # warm-up
    lat = {m: [] for m in modes}
    texts, tokens = {}, None
    for r in range(args.repeats):
        for mode, fn in (modes.items() if r % 2 == 0 else reversed(modes.items())):
            got, texts[mode], tokens = once(fn)
            lat[mode] += got
    assert len(set(map(tuple, texts.values()))) == 1, "the modes returned different texts"
    rows = {m: {"p50_s": _quantile(v, 0.5), "p95_s": _quantile(v, 0.95),
                "mean_s": statistics.fmean(v), "max_s": max(v), "n": len(v)}
            for m, v in lat.items()}
    report = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads(),
              "completion_tokens": {"min": min(tokens), "median": statistics.median(tokens),
                                    "max": max(tokens)},
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "modes": rows}
    print(f"{args.requests} requests x {args.max_tokens} max tokens, {args.repeats} repeats; "
          f"completion tokens {report['completion_tokens']}")
    for m, r in rows.items():
        print(f"{m:>20}: p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  mean {r['mean_s']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
