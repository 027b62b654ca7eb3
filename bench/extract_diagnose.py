"""Benchmark `harc extract` + `harc diagnose` on the built-in SmolLM2-135M-Instruct (CPU).

1. The user flow: 100 harmful + 100 harmless prompts, 100 on-policy triples and 100 benign
   answers synthesised by the model (generation included), then diagnose with two attack families.
2. Memory scaling: extraction again from the same pairs with 50, 100 and 200 prompts per side;
   peak RSS should stay flat (running sums; the bootstrap keeps K sums, not examples).

Prints one JSON record. Usage: python bench/extract_diagnose.py [--out runs/bench-extract]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def timed(*args: str) -> dict:
    """Run `harc ARGS` in a child process; wall time and the child's peak RSS."""
    t = time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "harc", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"harc {' '.join(args)} failed: {proc.stderr[-800:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": round(time.time() - t, 1), "peak_rss_mb": round(max(peak, before) / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-extract")
    args = ap.parse_args()
    out = Path(args.out)
    subprocess.run([sys.executable, "-m", "harc", "fetch-model", "smollm2-135m-instruct"],
                   check=True, capture_output=True)
    rec = {"machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores",
           "model": "smollm2-135m-instruct"}
    ex = out / "n100"
    rec["extract_with_synth_100"] = timed("extract", "--n", "100", "--n-pairs", "100",
                                          "--out", str(ex))
    rec["diagnose"] = timed("diagnose", "--directions", str(ex / "directions.safetensors"),
                            "--out", str(out / "diagnose"), "--attack", "dan",
                            "--attack", "code_attack")
    rec["total_s"] = rec["extract_with_synth_100"]["wall_s"] + rec["diagnose"]["wall_s"]
    # Each child starts fresh, so ru_maxrss of RUSAGE_CHILDREN is the running max over children:
    # run the sizes from small to large and read the increments.
    rec["memory_scaling"] = {}
    for n in (50, 100, 200):
        rec["memory_scaling"][n] = timed(
            "extract", "--n", str(n), "--triples", str(ex / "triples.jsonl"),
            "--helpful", str(ex / "helpful.jsonl"), "--n-pairs", "100",
            "--out", str(out / f"scale{n}"))
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
