"""Flash-decoding attention in Triton for harc's decode step (one query token per row).

The slot cache holds row r's keys and values in columns [0, lens[r]) of a [rows, kv_heads, width,
head_dim] view. SDPA with a mask reads every row up to `width` (the bucket's widest row, ~1.4x
the ideal bytes at prompts of 300-600 tokens); this kernel reads each row's own columns only. One
program handles one (row, KV head, split): the KV head's query heads are the rows of one tile, so
each K/V column is read once for its whole group. Long rows are split over `splits` programs (the
split count depends on the batch shape only, so it is fixed per captured CUDA graph), each
writing a partial output and its log-sum-exp; a second kernel combines them. Scores and sums are
float32; the probabilities are rounded to the input dtype before the V product, as in
FlashAttention. Nothing syncs with the host and lengths are read on the device: the kernels can be
captured in CUDA graphs.

Triton is imported on the first call. On CPU it runs only under Triton's interpreter
(TRITON_INTERPRET=1), for tests. `HARC_DECODE_ATTN=sdpa|triton` picks the path (default: triton
on CUDA, sdpa elsewhere); a Triton failure warns once and the caller uses SDPA from then on.
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
from torch import Tensor

from harc.errors import HarcError

MAX_SPLITS = 16
_broken: list[str] = []  # the first failure's message; non-empty: never try again in this process
_store_broken: list[str] = []  # the same, for the KV store kernel


def wanted(var: str, device: torch.device) -> bool:
    """Whether environment variable `var` asks for a Triton kernel on `device`: 'triton', or unset
    on CUDA ('torch' and 'sdpa' name the unfused paths)."""
    mode = os.environ.get(var, "").strip().lower()
    if mode not in ("", "torch", "sdpa", "triton"):
        raise HarcError(f"{var} must be 'triton' or 'sdpa' (or 'torch'), got {mode!r}")
    return mode == "triton" or (mode == "" and device.type == "cuda")


def runnable(device: torch.device) -> bool:
    """Whether Triton kernels run on `device`: CUDA, or CPU under Triton's interpreter."""
    return device.type == "cuda" or _interpreted()


def kernel_usable(var: str, device: torch.device, broken: list[str], load, fail) -> bool:
    """Whether a Triton kernel should run on `device`: asked for by `var` (`wanted`), runnable
    here, never failed in this process (`broken`), and `load()` builds it; a build failure goes
    to `fail`."""
    if broken or not wanted(var, device) or not runnable(device):
        return False
    try:
        load()
    except Exception as e:  # no Triton, or a build that does not match the driver
        fail(e)
        return False
    return True


def hooked(m: torch.nn.Module) -> bool:
    """Whether calling `m` runs more than its class's forward: hooks, accelerate's offloading, a
    forward replaced on the instance (code that a fused path would skip)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
                or "forward" in m.__dict__)


def record_failure(broken: list[str], e: Exception, kernel: str, fallback: str) -> None:
    """Remember a kernel's first failure (it is not tried again) and warn once."""
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    broken.append(msg[:300])
    warnings.warn(f"the Triton {kernel} failed ({msg}); using {fallback}", stacklevel=4)


def enabled(device: torch.device) -> bool:
    """Whether decode steps on `device` should use the kernel: HARC_DECODE_ATTN=triton, or unset
    on CUDA, and it can run here (CUDA with an importable Triton, or CPU under Triton's
    interpreter). Warns once when Triton is installed but broken, or asked for and missing."""
    return kernel_usable("HARC_DECODE_ATTN", device, _broken, _kernels, _fail)


def _fail(e: Exception) -> None:
    record_failure(_broken, e, "decode attention", "SDPA")


def fits(query: Tensor, key: Tensor, value: Tensor, lens: Tensor) -> bool:
    """Shapes and dtypes the kernel handles: query [B, Hq, 1, D] with Hq a multiple of the
    [B, Hkv, W, D] keys' heads (at most 64 query heads per KV head), D a power of two in 16..256,
    one float dtype, unit stride along D; lens [B] integers on the same device."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    return (t == 1 and key.shape == value.shape and key.shape[0] == b and key.shape[3] == d
            and lens.shape == (b,) and lens.stride(0) == 1 and lens.device == query.device
            and lens.dtype in (torch.int32, torch.int64)
            and key.shape[2] > 0 and hq % hkv == 0 and hq // hkv <= 64
            and d in (16, 32, 64, 128, 256)
            and query.dtype == key.dtype == value.dtype
            and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(rows: int, kv_heads: int, width: int, device: torch.device) -> int:
    """Programs per (row, KV head): one per SM in all, each over at least 256 columns. Splitting
    only pays when the (row, KV head) programs cannot fill the SMs: on an H200 one split was the
    fastest at 256-2048 such programs of 364-664 columns, and the old target of 8 programs per SM
    made the kernel 1.0-2.6x slower (bench/decode_attn.py, docs/performance.md)."""
    want = -(-_sm_count(device) // (rows * kv_heads))
    return max(1, min(MAX_SPLITS, want, width // 256))


def attend(query: Tensor, key: Tensor, value: Tensor, lens: Tensor, scale: float | None,
           splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
           num_stages: int = 2) -> Tensor | None:
    """softmax(q k^T * scale) v over each row's first `lens[r]` columns (clamped to the width), as
    [B, 1, Hq, D]; query head h reads KV head h // (Hq / Hkv), as in transformers' `repeat_kv`.
    None when the kernel does not fit the inputs or has failed (then it warned once). `splits`,
    `block_n` (columns per loop step), `num_warps` and `num_stages` are the launch parameters
    that `bench/decode_attn.py` tunes."""
    if _broken or not fits(query, key, value, lens):
        return None
    b, hq, _, d = query.shape
    hkv, width = key.shape[1], key.shape[2]
    g = hq // hkv
    if splits is None:
        splits = default_splits(b, hkv, width, query.device)
    scale = d ** -0.5 if scale is None else scale
    out = query.new_empty((b, 1, hq, d))
    part = torch.empty((b, hq, splits, d), dtype=torch.float32, device=query.device)
    lse = torch.empty((b, hq, splits), dtype=torch.float32, device=query.device)
    try:
        fwd, reduce = _kernels()
        fwd[(b, hkv, splits)](
            query, key, value, lens, out, part, lse,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(2),
            width, splits, scale * math.log2(math.e),
            G=g, GP=max(16, 1 << (g - 1).bit_length()), D=d,
            BLOCK_N=block_n or (64 if d <= 128 else 32),
            F32DOT=query.dtype == torch.float32 or _interpreted(), num_warps=num_warps,
            num_stages=num_stages)
        if splits > 1:
            reduce[(b, hq)](part, lse, out, out.stride(0), out.stride(2), splits,
                            D=d, SP=MAX_SPLITS, num_warps=4)
    except Exception as e:  # compilation or launch: SDPA from now on
        _fail(e)
        return None
    return out


def store_enabled(device: torch.device) -> bool:
    """Whether decode steps on `device` should write keys and values with `store_kv`
    (HARC_DECODE_STORE=triton, or unset on CUDA) rather than two scatters (`torch`)."""
    return kernel_usable("HARC_DECODE_STORE", device, _store_broken, _store_kernel, _store_fail)


def _store_fail(e: Exception) -> None:
    record_failure(_store_broken, e, "KV store", "scatters")


def store_kv(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor, cols: Tensor) -> bool:
    """Write a decode step's keys and values [B, Hkv, 1, D] into column cols[r] of rows [:B] of the
    [S, Hkv, L, D] caches, both in one launch (two scatters cost two launches per layer and step).
    False, having written nothing, when the kernel does not fit or has failed: the caller writes."""
    b, hkv, t, d = key.shape
    if (_store_broken or t != 1 or value.shape != key.shape or k_cache.shape != v_cache.shape
            or k_cache.shape[0] < b or k_cache.shape[1] != hkv or k_cache.shape[3] != d
            or d & (d - 1) or not k_cache.is_contiguous() or not v_cache.is_contiguous()
            or not key.dtype == value.dtype == k_cache.dtype == v_cache.dtype
            or key.stride(-1) != 1 or value.stride(-1) != 1 or cols.numel() != b
            or cols.dtype not in (torch.int32, torch.int64)):
        return False
    try:
        _store_kernel()[(b,)](k_cache, v_cache, key, value, cols, cols.stride(0),
                              k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                              key.stride(0), key.stride(1), value.stride(0), value.stride(1),
                              H=hkv, HP=1 << (hkv - 1).bit_length(), D=d, num_warps=1)
    except Exception as e:  # compilation or launch: scatters from now on
        _store_fail(e)
        return False
    return True


@functools.cache
def _store_kernel():
    """The KV store kernel, defined on first use (see `_kernels`)."""
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def kv_store(K, V, KN, VN, Cols, scol, skb, skh, skn, sknb, sknh, svnb, svnh,
                 H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        col = tl.load(Cols + row * scol).to(tl.int64)
        h = tl.arange(0, HP)[:, None]
        dd = tl.arange(0, D)[None, :]
        m = h < H
        at = row * skb + h * skh + col * skn + dd
        tl.store(K + at, tl.load(KN + row * sknb + h * sknh + dd, mask=m), mask=m)
        tl.store(V + at, tl.load(VN + row * svnb + h * svnh + dd, mask=m), mask=m)

    return kv_store


def _interpreted() -> bool:
    # Triton's interpreter multiplies 16-bit floats wrongly in tl.dot (3.9): it gets float32
    # operands holding the same values; the GPU multiplies 16-bit operands on tensor cores.
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    """(forward, reduce) Triton kernels, defined on first use: importing Triton takes a while,
    and whether it interprets is decided when a kernel is defined."""
    global tl  # the interpreter looks the language module up in the kernels' globals
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["width", "n_splits"])
    def fwd(Q, K, V, Lens, Out, Part, Lse,
            sqb, sqh, skb, skh, skn, svb, svh, svn, sob, soh,
            width, n_splits, qk_scale,
            G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
            F32DOT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        n = tl.minimum(tl.load(Lens + row).to(tl.int32), width)
        # each split takes a whole number of blocks of this row's columns
        chunk = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n)

        heads = kvh * G + tl.arange(0, GP)
        hmask = tl.arange(0, GP) < G
        dd = tl.arange(0, D)
        q = tl.load(Q + row * sqb + heads[:, None] * sqh + dd[None, :], mask=hmask[:, None],
                    other=0.0)
        kbase = K + row * skb + kvh * skh
        vbase = V + row * svb + kvh * svh
        m = tl.full([GP], float("-inf"), tl.float32)
        lsum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            valid = cols < hi
            kt = tl.load(kbase + cols[None, :] * skn + dd[:, None], mask=valid[None, :], other=0.0)
            if F32DOT:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            lsum = lsum * alpha + tl.sum(p, 1)
            v = tl.load(vbase + cols[:, None] * svn + dd[None, :], mask=valid[:, None], other=0.0)
            if F32DOT:
                pv = p.to(v.dtype).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(pv, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        res = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
        if n_splits == 1:
            tl.store(Out + row * sob + heads[:, None] * soh + dd[None, :],
                     res.to(Out.dtype.element_ty), mask=hmask[:, None])
        else:
            at = (row * G * tl.num_programs(1) + heads) * n_splits + split
            tl.store(Part + at[:, None] * D + dd[None, :], res, mask=hmask[:, None])
            tl.store(Lse + at, tl.where(lsum > 0, m + tl.log2(tl.where(lsum > 0, lsum, 1.0)),
                                          float("-inf")), mask=hmask)

    @triton.jit(do_not_specialize=["n_splits"])
    def reduce(Part, Lse, Out, sob, soh, n_splits, D: tl.constexpr, SP: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        sp = tl.arange(0, SP)
        smask = sp < n_splits
        dd = tl.arange(0, D)
        at = (row * tl.num_programs(1) + head) * n_splits + sp
        lse = tl.load(Lse + at, mask=smask, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
        part = tl.load(Part + at[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
        den = tl.sum(w, 0)
        res = tl.sum(part * w[:, None], 0) / tl.where(den > 0, den, 1.0)
        tl.store(Out + row * sob + head * soh + dd, res.to(Out.dtype.element_ty))

    return fwd, reduce
