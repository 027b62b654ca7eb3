"""Rotary position embedding of queries and keys in one Triton kernel, for harc's decoder.

transformers' `apply_rotary_pos_emb` (Llama, Qwen2, Mistral, ...) runs about ten element-wise
kernels per layer: two multiplies, a slice-negate-concatenate (`rotate_half`) and an add, for the
queries and again for the keys. In a batch-256 decode step of a 7B model those launches cost time
even inside a CUDA graph (issue #12's profile, docs/performance.md). The kernel rotates every query
and key head of a token in one pass, rounding where transformers rounds (each product to the input
dtype, then their sum), and writes outputs with the inputs' strides.

`fused_rotary(model)` replaces the module-level `apply_rotary_pos_emb` of the model's attention
classes while decoding, after checking the kernel against that function on a random input; a
module whose function disagrees keeps it. Calls the kernel does not take (another signature or
layout, tensors that need gradients) go to the original. `HARC_DECODE_ROPE=torch|triton` picks
(default: triton on CUDA); a failure warns once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from harc._decode_attn import kernel_usable, record_failure

_broken: list[str] = []
NAME = "apply_rotary_pos_emb"


def enabled(device: torch.device) -> bool:
    """Whether decoding on `device` should use the kernel (HARC_DECODE_ROPE=triton, or unset on
    CUDA) and Triton imports."""
    return kernel_usable("HARC_DECODE_ROPE", device, _broken, _kernel, _fail)


def _fail(e: Exception) -> None:
    record_failure(_broken, e, "rotary embedding", "transformers' rotary embedding")


def fits(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """q [B, Hq, T, D] and k [B, Hk, T, D] (any strides, unit stride along D, one dtype), cos and
    sin [B or 1, T, D] of that dtype, D even."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        return False
    b, _, t, d = q.shape
    half = d // 2
    return (k.shape[0] == b and k.shape[2:] == (t, d) and d == 2 * half and half >= 4
            and half & (half - 1) == 0  # tl.arange takes powers of two
            and cos.shape[0] in (1, b) and cos.shape[1:] == (t, d)
            and q.dtype == k.dtype == cos.dtype == sin.dtype
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
            and q.device == k.device == cos.device == sin.device)


def rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), cos and sin broadcast over heads, for
    inputs that `fits`."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # the inputs' strides, as transformers'
    cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    sb = 0 if sin.shape[0] == 1 else sin.stride(0)
    # A program rotates HB heads of one token and reads its cos and sin once: one program per
    # head took 6.6 us a layer at batch 256 on an H200 (issue #12's profile), ~8x its bytes.
    hb = min(8, 1 << (min(hq, hk).bit_length() - 1))
    # No fused multiply-adds: with them the H200 results differed from transformers' in the last
    # bit in every dtype (tests/unit/test_decode_rope.py), and bf16 greedy tokens changed.
    _kernel()[(b * t, -(-hq // hb) + -(-hk // hb))](
        q, k, cos, sin, qo, ko, t, hq, hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cb, cos.stride(1), sb, sin.stride(1), HALF=d // 2, HB=hb,
        num_warps=max(1, min(4, hb * d // 512)), enable_fp_fusion=False)
    return qo, ko


def _matches(original, dev: torch.device) -> bool:
    """The kernel reproduces `original(q, k, cos, sin)` on a random input of the decode shape."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 1, 64, generator=g), torch.randn(3, 2, 1, 64, generator=g)
    ang = torch.randn(3, 1, 32, generator=g) * 3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        args = [x.to(dev, dtype) for x in (q, k, cos, sin)]
        ref, ours = original(*args), rotate(*args)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -6
        ok &= all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(ours, ref))
    return bool(ok)


def _fused(original, q, k, cos, sin, *args, **kwargs):
    if (args or set(kwargs) - {"unsqueeze_dim"} or kwargs.get("unsqueeze_dim", 1) != 1 or _broken
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
            or not fits(q, k, cos, sin)):
        return original(q, k, cos, sin, *args, **kwargs)
    try:
        return rotate(q, k, cos, sin)
    except Exception as e:  # compilation or launch: transformers' from now on
        _fail(e)
        return original(q, k, cos, sin, *args, **kwargs)


@contextmanager
def fused_rotary(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block the modules of the model's attention classes apply rotary embeddings with
    the kernel; yields how many modules were patched."""
    dev = next(model.parameters()).device
    modules = {}
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if type(m).__name__.endswith("Attention") and callable(getattr(mod, NAME, None)):
            modules[mod.__name__] = mod
    patched: list[tuple[object, object]] = []
    try:
        for mod in modules.values():
            original = getattr(mod, NAME)
            if getattr(original, "_harc_original", None) is not None:
                continue  # patched by an enclosing call
            with torch.no_grad():
                if not _matches(original, dev):
                    continue
            fused = functools.partial(_fused, original)
            fused._harc_original = original
            setattr(mod, NAME, fused)
            patched.append((mod, original))
    except Exception as e:  # compilation or launch: keep transformers' function
        _fail(e)
    try:
        yield len(patched)
    finally:
        for mod, original in patched:
            setattr(mod, NAME, original)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (see harc._decode_attn._kernels)."""
    global tl  # the interpreter looks the language module up in the kernel's globals
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["t", "hq", "hk"])
    def rope(Q, K, C, S, QO, KO, t, hq, hk,
             sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, skob, skoh, skot,
             scb, sct, ssb, sst, HALF: tl.constexpr, HB: tl.constexpr):
        bt = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        b = bt // t
        p = bt % t
        nq = tl.cdiv(hq, HB)
        hh = tl.arange(0, HB)
        if g < nq:
            heads = g * HB + hh
            live = heads < hq
            src = Q + b * sqb + p * sqt + heads.to(tl.int64)[:, None] * sqh
            dst = QO + b * sob + p * sot + heads.to(tl.int64)[:, None] * soh
        else:
            heads = (g - nq) * HB + hh
            live = heads < hk
            src = K + b * skb + p * skt + heads.to(tl.int64)[:, None] * skh
            dst = KO + b * skob + p * skot + heads.to(tl.int64)[:, None] * skoh
        lo = tl.arange(0, HALF)
        cs = C + b * scb + p * sct
        sn = S + b * ssb + p * sst
        dt = Q.dtype.element_ty
        m = live[:, None]
        x1 = tl.load(src + lo[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + lo[None, :], mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cs + lo).to(tl.float32)[None, :]
        c2 = tl.load(cs + HALF + lo).to(tl.float32)[None, :]
        s1 = tl.load(sn + lo).to(tl.float32)[None, :]
        s2 = tl.load(sn + HALF + lo).to(tl.float32)[None, :]
        # transformers: (x * cos) + (rotate_half(x) * sin), each product rounded to the dtype
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(dst + lo[None, :], o1.to(dt), mask=m)
        tl.store(dst + HALF + lo[None, :], o2.to(dt), mask=m)

    return rope
