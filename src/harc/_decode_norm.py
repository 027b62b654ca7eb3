"""RMSNorm in one Triton kernel for harc's decoder, in place of transformers' eager one.

transformers' Llama-style RMSNorm (Llama, Qwen2, Mistral, ...) runs about eight element-wise
kernels: cast to float32, square, mean, add eps, rsqrt, multiply, cast back, multiply by the
weight. In a batch-256 decode step of a 7B model those are ~450 tiny launches per step (two norms
per layer), each paying a launch and a pass over memory even inside a CUDA graph. The kernel does
the same arithmetic in one pass per row, rounding where transformers rounds (the normalised row to
the input dtype, then the product with the weight), so only the order of the float32 sum differs.

`fused_norms(model)` swaps the forward of the model's Llama-style RMSNorm modules for the kernel
while decoding, after checking each class against its own forward on a random input; a class that
disagrees, and modules whose forward someone else already replaced, keep theirs. Inputs the kernel
does not take (another dtype than the weight's, a non-contiguous row) go through the original.
`HARC_DECODE_NORM=torch|triton` picks (default: triton on CUDA); a failure warns once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from harc._decode_attn import kernel_usable, record_failure

_broken: list[str] = []


def enabled(device: torch.device) -> bool:
    """Whether decoding on `device` should use the kernel (HARC_DECODE_NORM=triton, or unset on
    CUDA) and Triton imports."""
    return kernel_usable("HARC_DECODE_NORM", device, _broken, _kernel, _fail)


def _fail(e: Exception) -> None:
    record_failure(_broken, e, "RMSNorm", "transformers' RMSNorm")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the mean and product in float32, over
    the last dimension of a contiguous x whose dtype is the weight's."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    block = 1 << (n - 1).bit_length()
    _kernel()[(rows.shape[0],)](rows, weight, out, n, eps, BLOCK=block,
                                num_warps=max(1, min(8, block // 256)))
    return out.view(x.shape)


def _matches(module: torch.nn.Module) -> bool:
    """The kernel reproduces the module's own forward on a random input (within rounding)."""
    w = module.weight
    n = w.shape[0]  # deterministic rows of several scales (the global RNG stays untouched)
    x = (torch.linspace(-4, 4, 3 * n, device=w.device).reshape(3, n) * torch.tensor(
        [[1.0], [0.01], [30.0]], device=w.device)).roll(n // 3).to(w.dtype)
    ref = type(module).forward(module, x)
    ours = rms_norm(x, w, module.variance_epsilon)
    tol = 1e-5 if w.dtype == torch.float32 else 2 ** -6
    return ref.dtype == ours.dtype and torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol)


def _llama_style(m: torch.nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__.endswith("RMSNorm") and isinstance(w, torch.nn.Parameter)
            and w.dim() == 1 and isinstance(getattr(m, "variance_epsilon", None), float)
            and "forward" not in m.__dict__)


@contextmanager
def fused_norms(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block the model's Llama-style RMSNorm modules run the kernel; yields how many."""
    mods = [m for m in model.modules() if _llama_style(m)]
    patched: list[torch.nn.Module] = []
    try:
        verdict: dict[type, bool] = {}
        for m in mods:
            if type(m) not in verdict:
                with torch.no_grad():
                    verdict[type(m)] = _matches(m)
            if verdict[type(m)]:
                m.forward = functools.partial(_forward, m)
                patched.append(m)
    except Exception as e:  # compilation or launch: keep transformers' norms
        _fail(e)
        for m in patched:
            m.__dict__.pop("forward", None)
        patched = []
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _forward(module: torch.nn.Module, x: Tensor) -> Tensor:
    w = module.weight
    if x.dtype != w.dtype or not x.is_contiguous() or x.shape[-1] != w.shape[0] or _broken:
        return type(module).forward(module, x)
    return rms_norm(x, w, module.variance_epsilon)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (see harc._decode_attn._kernels)."""
    global tl  # the interpreter looks the language module up in the kernel's globals
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rows(X, W, Y, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        h = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps))
        h = h.to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n + cols, (w * h).to(Y.dtype.element_ty), mask=mask)

    return rms_norm_rows
