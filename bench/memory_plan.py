"""Computed per-GPU memory of HARC training on 1/2/4/8 H200s under DDP and FSDP2 (no GPU needed).

    python bench/memory_plan.py                      # Markdown table to stdout
    python bench/memory_plan.py --json docs/bench/memory_plan.json

Model: `harc.memplan` (components, calibration and its fit on the measured H200 micro-step).
Micro-batch 6 + 4 + 2 rows of 416 padded tokens (the calibration bench's mean width, about 400
real tokens), LoRA r 32 on the seven projections with float32 parameters, gradients and AdamW
states, K = 4 coupling layers, logits chunk 1024. Every figure is computed, none measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from harc.memplan import CALIBRATION, FIT, GIB, MODELS, plan  # noqa: E402

CAPACITY_GIB = 141e9 / GIB  # the H200's 141 GB
HEADROOM = 0.9  # allocator fragmentation, CUDA context and NCCL buffers take the rest
SETUPS = [("single", 1), ("ddp", 2), ("ddp", 4), ("ddp", 8), ("fsdp2", 2), ("fsdp2", 4),
          ("fsdp2", 8)]

# Peaks of the trainer's stage in bench/paper_configs.py (docs/bench/paper_configs-h200.json):
# one optimizer step of 2 micro-batches (mean padded width per micro-batch from the record), 8-token
# responses (about 48 KL and CE positions), K = 2 layers. AdamW's state appears only at the first
# optimizer.step, after the backward peak, so it is left out of the prediction.
VALIDATION = [("Llama-3.1-8B", "compile: true", 1824 / 2, True, 20.34),
              ("Llama-3.1-8B", "compile: false", 1824 / 2, False, 21.5),
              ("Qwen2.5-7B", "compile: true", 960 / 2, True, 17.42)]


def verdict(gib: float) -> str:
    if gib <= HEADROOM * CAPACITY_GIB:
        return "fits"
    return "tight" if gib <= CAPACITY_GIB else "OOM"


def rows() -> list[dict]:
    out = []
    for d in MODELS.values():
        for strategy, n in SETUPS:
            p = plan(d, strategy, n)
            rec = p.as_dict()
            for key, ckpt, comp in [("eager", False, False), ("compiled", False, True),
                                    ("checkpointed", True, False)]:
                rec[f"peak_{key}"] = round(p.peak(ckpt, comp), 1)
                rec[f"fit_{key}"] = verdict(p.peak(ckpt, comp))
            out.append(rec)
    return out


def validation() -> list[dict]:
    out = []
    for name, variant, width, compiled, measured in VALIDATION:
        d = MODELS[name]
        p = plan(d, "single", 1, row_tokens=width / 12, resp_positions=48, couple_layers=2)
        pred = p.peak(compiled=compiled) - 8 * d.lora_params() / GIB
        out.append({"model": name, "variant": variant, "padded_tokens_per_micro_batch": width,
                    "computed_gib": round(pred, 2), "measured_gib": measured,
                    "error": f"{(pred - measured) / measured:+.1%}"})
    return out


def markdown(recs: list[dict], val: list[dict]) -> str:
    lines = ["| model | setup | weights | LoRA state | activations eager / compiled / ckpt | "
             "peak eager | peak `compile: true` | peak with checkpointing |",
             "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["strategy"] == "ddp" and r["gpus"] > 2:
            continue  # a full replica per GPU: the same figures on any number of GPUs
        setup = {"single": "1 GPU", "ddp": "DDP x2-x8"}.get(r["strategy"], f"FSDP2 x{r['gpus']}")
        w = r["weights"] + r["weights_in_flight"]
        lines.append(
            f"| {r['model']} | {setup} | {w:.1f} | {r['lora'] + r['ddp_buckets']:.2f} | "
            f"{r['act_eager']:.1f} / {r['act_compiled']:.1f} / {r['act_checkpointed']:.1f} | "
            + " | ".join(f"{r[f'peak_{k}']:.1f} {r[f'fit_{k}']}"
                         for k in ("eager", "compiled", "checkpointed")) + " |")
    lines += ["", "| validation run | computed | measured | error |", "|---|---|---|---|"]
    for v in val:
        lines.append(f"| {v['model']}, {v['variant']}, {v['padded_tokens_per_micro_batch']:.0f} "
                     f"tokens | {v['computed_gib']:.2f} | {v['measured_gib']:.2f} | {v['error']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the records here")
    args = ap.parse_args()
    recs, val = rows(), validation()
    print(markdown(recs, val))
    if args.json:
        args.json.write_text(json.dumps({
            "kind": "computed (no measurement)", "capacity_gib": round(CAPACITY_GIB, 1),
            "headroom": HEADROOM, "calibration": CALIBRATION,
            "fit": {k: round(v, 4) for k, v in FIT.items()},
            "micro_batch": {"rows": 12, "row_tokens": 416, "couple_layers": 4, "chunk": 1024},
            "setups": recs, "validation": val}, indent=2) + "\n")


if __name__ == "__main__":
    main()
