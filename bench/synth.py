"""Benchmark on-policy triple synthesis (`harc.synth`): N harmful prompts from AdvBench and
N benign prompts from harc's set, on a built-in model; prints one JSON record.

    python bench/synth.py --model qwen2.5-coder-0.5b-instruct --n 300 --batch-size 64   # GPU
    python bench/synth.py --model smollm2-135m-instruct --n 50                          # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from harc.chat import ChatFormat
from harc.data import load
from harc.models import load_model
from harc.synth import synth_triples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    t0 = time.time()
    model, tok = load_model(args.model)
    load_s = time.time() - t0
    harm = [r["prompt"] for r in load("advbench", limit=args.n)]
    safe = [r["prompt"] for r in load("harc-benign", limit=args.n)]
    t0 = time.time()
    triples, helpful = synth_triples(model, ChatFormat(tok), harm, safe, use_cache=False,
                                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.time() - t0
    count = {}
    for t in triples:
        for k in ("refusal_source", "completion_source"):
            count[f"{k}:{t[k]}"] = count.get(f"{k}:{t[k]}", 0) + 1
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(json.dumps({"model": args.model, "card": card, "n_triples": len(triples),
                      "n_benign": len(helpful), "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.batch_size, "load_s": round(load_s, 1),
                      "synth_s": round(wall, 1), "sources": count,
                      "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
