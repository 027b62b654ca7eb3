"""Time the main job (`harc run --config configs/smollm2_135m.yaml`) stage by stage: wall and CPU
seconds of this process per pipeline step, and the load of the machine while it ran (CPU seconds
say what the work costs on a shared machine; wall seconds only on an idle one).

Prints one JSON record. Usage:
    python bench/main_job.py [--out runs/bench-main] [--fresh-cache] [--profile FILE] [key=value ...]
--fresh-cache: an empty HARC_CACHE (the model is downloaded and converted, nothing synthesised
is reused), as on a new machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/smollm2_135m.yaml")
    ap.add_argument("--out", default="runs/bench-main")
    ap.add_argument("--fresh-cache", action="store_true")
    ap.add_argument("--profile", help="also write a cProfile of the run here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.fresh_cache:
        os.environ["HARC_CACHE"] = tempfile.mkdtemp(prefix="harc-cache-")
    shutil.rmtree(args.out, ignore_errors=True)

    from harc.pipeline import load_run_config, run_pipeline
    from harc.pipeline.run import Pipeline

    steps: dict[str, dict] = {}
    timed = Pipeline._timed

    def measured(self, name, fn, *a, **kw):
        t0, c0 = time.time(), time.process_time()
        try:
            return timed(self, name, fn, *a, **kw)
        finally:
            steps[name] = {"wall_s": round(time.time() - t0, 1),
                           "cpu_s": round(time.process_time() - c0, 1)}
            print(f"{name}: {steps[name]}", file=sys.stderr, flush=True)

    Pipeline._timed = measured
    rc = load_run_config(args.config, [f"output_dir={args.out}", *args.overrides])
    load0, t0, c0 = os.getloadavg()[0], time.time(), time.process_time()
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.runcall(run_pipeline, rc, lambda m: None)
        prof.dump_stats(args.profile)
    else:
        run_pipeline(rc, log=lambda m: None)
    total = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    print(json.dumps({"config": args.config, "overrides": args.overrides,
                      "fresh_cache": args.fresh_cache, "steps": steps, "total": total,
                      "load_avg_1min": {"start": round(load0, 2),
                                        "end": round(os.getloadavg()[0], 2)},
                      "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                      "results": str(Path(args.out) / "results.json")}, indent=1))


if __name__ == "__main__":
    main()
