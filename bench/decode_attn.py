"""The decode attention kernel (`harc._decode_attn`) alone: time and achieved memory bandwidth of
each launch configuration (splits per row, columns per loop step, warps, pipeline stages) on the
decode shapes of Qwen2.5-7B and Llama-3.1-8B, against the ideal of reading each row's keys and
values once. Writes JSON to --out and prints the best configurations per shape.

    python bench/decode_attn.py --out $OUT/decode_attn.json    # CUDA only, about 2 min (H200)

Shapes: --batches rows of --lens columns each (uniform, seeded; the decode of prompts of 300-600
tokens halfway through 128 new tokens), bf16, the width rounded up as the engine's buckets do.
Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs), median. The kernel's
output is checked against SDPA with an explicit mask for every configuration.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harc import _decode_attn  # noqa: E402
from harc._decode import width_bucket  # noqa: E402
from harc.io import atomic_write_json  # noqa: E402

ARCHS = {"qwen2-7b": (28, 4, 128), "llama3-8b": (32, 8, 128)}  # query heads, KV heads, head dim


def reference(q, k, v, lens, scale):
    b, hq, _, d = q.shape
    hkv, w = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, hq // hkv, d).float()
    mask = torch.arange(w, device=q.device)[None, :] < lens[:, None]
    out = F.scaled_dot_product_attention(qg, k.float(), v.float(), attn_mask=mask[:, None, None, :],
                                         scale=scale)
    return out.reshape(b, 1, hq, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", default="qwen2-7b,llama3-8b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--lens", default="364-664")
    ap.add_argument("--splits", default="0,1,2,4,8,16", help="0: the default heuristic")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--peak-bw", type=float, default=4.8e12)
    args = ap.parse_args()
    if bad := [a for a in args.archs.split(",") if a not in ARCHS]:
        ap.error(f"--archs: unknown {bad}; known: {', '.join(ARCHS)}")
    if not torch.cuda.is_available():
        sys.exit("bench/decode_attn.py needs CUDA")
    import triton.testing

    dev = torch.device("cuda")
    lo, hi = (int(x) for x in args.lens.split("-"))
    result = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "args": vars(args), "shapes": {}}
    for arch, b in itertools.product(args.archs.split(","), map(int, args.batches.split(","))):
        hq, hkv, d = ARCHS[arch]
        rng = random.Random(b)
        lens_l = [rng.randint(lo, hi) for _ in range(b)]
        width = width_bucket(max(lens_l), 1 << 20)
        torch.manual_seed(0)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, width, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, width, d, device=dev, dtype=torch.bfloat16)
        lens = torch.tensor(lens_l, device=dev)
        scale = d ** -0.5
        ref = reference(q, k, v, lens, scale)
        ideal = sum(lens_l) * hkv * d * 2 * 2  # keys and values, bf16
        default = _decode_attn.default_splits(b, hkv, width, dev)
        rows = []
        for sp, bn, nw, ns in itertools.product(map(int, args.splits.split(",")),
                                                map(int, args.block_n.split(",")),
                                                map(int, args.warps.split(",")),
                                                map(int, args.stages.split(","))):
            splits = sp or default
            _decode_attn._broken.clear()
            cfg = dict(splits=splits, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                out = _decode_attn.attend(q, k, v, lens, scale, **cfg)
                if out is None:
                    raise RuntimeError(_decode_attn._broken[0] if _decode_attn._broken else "None")
                err = (out.float() - ref).abs().max().item()
                inputs = (q, k, v, lens, scale)
                ms = triton.testing.do_bench(lambda c=cfg, x=inputs: _decode_attn.attend(*x, **c),
                                             warmup=10, rep=50, return_mode="median")
            except Exception as e:  # a configuration the card cannot launch (shared memory, ...)
                rows.append({**cfg, "heuristic": sp == 0, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            rows.append({**cfg, "heuristic": sp == 0, "ms": ms, "max_abs_err": err,
                         "bandwidth_fraction": ideal / (ms * 1e-3) / args.peak_bw})
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        current = next((r for r in ok if r["heuristic"] and r["block_n"] == 64 and r["num_warps"] == 4
                        and r["num_stages"] == 2), None)
        result["shapes"][f"{arch}-b{b}"] = {
            "rows": b, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "width": width,
            "kv_bytes": ideal, "ideal_ms": ideal / args.peak_bw * 1e3, "default_splits": default,
            "current": current, "best": ok[:5], "all": rows}
        print(f"{arch} b{b}: ideal {ideal / args.peak_bw * 1e3:.3f} ms; current "
              f"{current['ms'] if current else float('nan'):.3f} ms; best {ok[0]['ms']:.3f} ms "
              f"{ {k: ok[0][k] for k in ('splits', 'block_n', 'num_warps', 'num_stages')} }"
              f" ({ok[0]['bandwidth_fraction']:.2f} of peak), max err {ok[0]['max_abs_err']:.2e}")
        atomic_write_json(args.out, result)  # a kill mid-write keeps the shapes written before


if __name__ == "__main__":
    main()
