"""The GEMMs of a 7B decode step alone, per backend: cuBLAS (PyTorch's default), cuBLASLt
(`torch.backends.cuda.preferred_blas_library`) and Triton (inductor's max-autotune templates).
Writes JSON to --out and prints ms and TFLOP/s; each backend's output is compared bit for bit
with the first backend's (cuBLAS by default).

    python bench/decode_gemm.py --out $OUT/decode_gemm.json    # CUDA only, a few minutes (H200)

Shapes: --rows tokens (the decode batch) times the merged projections harc's decoder runs
(q/k/v with Qwen2's bias, o, gate/up, down) and the LM head, from bench/generate.py's --archs
dimensions, bf16, random weights. Timing: triton.testing.do_bench (L2 flushed, median), and a
sustained figure: back-to-back calls for --sustain-s seconds, CUDA events, where a power-capped
card runs at its steady clock as a long decode does.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import ARCHS  # noqa: E402

from harc.io import atomic_write_json  # noqa: E402

BACKENDS = ("cublas", "cublaslt", "triton")


def shapes(arch: str) -> dict[str, tuple[int, int, bool]]:
    c = ARCHS[arch][1]
    h, i, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    return {"qkv": (h + 2 * c["num_key_value_heads"] * d, h, arch.startswith("qwen")),
            "o": (h, h, False), "gate_up": (2 * i, h, False), "down": (h, i, False),
            "lm_head": (c["vocab_size"], h, False)}


def sustained(fn, seconds: float) -> float:
    """ms per call over back-to-back calls for about `seconds`."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        fn()
    end.record()
    end.synchronize()
    n = max(20, int(seconds * 1e3 / (start.elapsed_time(end) / 20)))
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--archs", default="qwen2-7b,llama3-8b")
    ap.add_argument("--rows", default="256")
    ap.add_argument("--backends", default="cublas,cublaslt,triton")
    ap.add_argument("--sustain-s", type=float, default=1.0)
    args = ap.parse_args()
    archs, backends = args.archs.split(","), args.backends.split(",")
    if bad := [a for a in archs if a not in ARCHS]:
        ap.error(f"--archs: unknown {bad}; known: {', '.join(ARCHS)}")
    if bad := [b for b in backends if b not in BACKENDS]:
        ap.error(f"--backends: unknown {bad}; known: {', '.join(BACKENDS)}")
    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        ap.error(f"--rows must be positive integers, comma-separated, got {args.rows!r}")
    if args.sustain_s <= 0:
        ap.error("--sustain-s must be positive")
    if not torch.cuda.is_available():
        sys.exit("bench/decode_gemm.py needs CUDA")
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor
    import triton.testing

    dynamo.recompile_limit = dynamo.cache_size_limit = 64  # one graph per shape
    inductor.max_autotune_gemm_backends = "TRITON"
    if hasattr(inductor.triton, "enable_persistent_tma_matmul"):  # Hopper's TMA templates too
        inductor.triton.enable_persistent_tma_matmul = True
    dev = torch.device("cuda")
    result = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "args": vars(args), "cases": {}}
    compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    default_lib = torch.backends.cuda.preferred_blas_library()
    for arch in archs:
        for m in rows:
            for name, (n, k, bias) in shapes(arch).items():
                torch.manual_seed(0)
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
                b = torch.randn(n, device=dev, dtype=torch.bfloat16) if bias else None
                flops = 2 * m * n * k
                row, ref = {"m": m, "n": n, "k": k, "bias": bias}, None
                for backend in backends:
                    torch.backends.cuda.preferred_blas_library(
                        "cublaslt" if backend == "cublaslt" else default_lib)
                    op = compiled if backend == "triton" else F.linear
                    fn = functools.partial(op, x, w, b)
                    try:
                        out = fn()
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                        ms_s = sustained(fn, args.sustain_s)
                    except Exception as e:  # a backend this stack cannot run
                        row[backend] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        continue
                    ref = out if ref is None else ref
                    row[backend] = {"ms": ms, "tflops": flops / ms / 1e9, "sustained_ms": ms_s,
                                    "sustained_tflops": flops / ms_s / 1e9,
                                    "bit_identical_to_first": bool(torch.equal(out, ref)),
                                    "max_abs_diff": (out.float() - ref.float()).abs().max().item()}
                torch.backends.cuda.preferred_blas_library(default_lib)
                result["cases"][f"{arch}-m{m}-{name}"] = row
                print(f"{arch} m{m} {name:8s} " + "  ".join(
                    f"{bk} {r['ms'] * 1e3:7.1f} us {r['tflops']:5.0f} TF (sust {r['sustained_tflops']:4.0f})"
                    for bk, r in row.items() if isinstance(r, dict) and "ms" in r), flush=True)
                atomic_write_json(args.out, result)  # a kill mid-write keeps the shapes before


if __name__ == "__main__":
    main()
