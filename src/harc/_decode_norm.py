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

`fused_residuals(blocks)` also folds each residual add into the RMSNorm that follows it: a
Llama-style decoder layer (input norm, attention, add, post-attention norm, MLP, add) runs with the
post-attention add and norm in one kernel, and its last add computes the next layer's input norm
too, which that layer takes instead of normalising again: four launches per layer become two. The
sum is rounded to the dtype before it is normalised, as transformers does, so outputs are unchanged
bit for bit against this module's RMSNorm. Each layer class is first checked against its own
forward on a deterministic input; layers with other children, hooked norms or a replaced forward
keep theirs. `HARC_DECODE_RESIDUAL=torch|triton` picks (default: triton on CUDA).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from harc._decode_attn import hooked, kernel_usable, record_failure

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
    _kernel()[(rows.shape[0],)](rows, rows, weight, rows, out, n, eps, BLOCK=block, ADD=False,
                                num_warps=max(1, min(8, block // 256)))
    return out.view(x.shape)


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rms_norm(s, weight, eps)) for s = x + y rounded to the dtype, in one pass over
    contiguous x and y of the weight's dtype and shape."""
    n = x.shape[-1]
    a, b = x.reshape(-1, n), y.reshape(-1, n)
    s, out = torch.empty_like(a), torch.empty_like(a)
    block = 1 << (n - 1).bit_length()
    _kernel()[(a.shape[0],)](a, b, weight, s, out, n, eps, BLOCK=block, ADD=True,
                             num_warps=max(1, min(8, block // 256)))
    return s.view(x.shape), out.view(x.shape)


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
    def rms_norm_rows(X, R, W, S, Y, n, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(X + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        if ADD:  # the residual sum, rounded to the dtype as transformers' add rounds it
            x = (x + tl.load(R + row * n + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(X.dtype.element_ty)
            tl.store(S + row * n + cols, x, mask=mask)
            x = x.to(tl.float32)
        h = x * (1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps))
        h = h.to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * n + cols, (w * h).to(Y.dtype.element_ty), mask=mask)

    return rms_norm_rows


# residual add + RMSNorm -----------------------------------------------------------------------
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def residual_enabled(device: torch.device) -> bool:
    """Whether decoding on `device` should fold residual adds into the norms
    (HARC_DECODE_RESIDUAL=triton, or unset on CUDA) and the kernel builds."""
    return kernel_usable("HARC_DECODE_RESIDUAL", device, _broken, _kernel, _fail)


class _Chain:
    """The input norm of the next layer, computed by the previous layer's last add:
    (that add's output, the norm module, the normalised output)."""

    pending: tuple[Tensor, torch.nn.Module, Tensor] | None = None


def _add_norm(x: Tensor, y: Tensor, norm: torch.nn.Module) -> tuple[Tensor, Tensor]:
    w = norm.weight
    if not _broken and x.dtype == y.dtype == w.dtype and x.shape == y.shape \
            and x.shape[-1] == w.shape[0] and x.is_contiguous() and y.is_contiguous():
        try:
            return add_rms_norm(x, y, w, norm.variance_epsilon)
        except Exception as e:  # compilation or launch: transformers' arithmetic from now on
            _fail(e)
    s = x + y
    return s, norm(s)


def _layer_forward(layer: torch.nn.Module, chain: _Chain, nxt: torch.nn.Module | None,
                   hidden_states: Tensor, *args, **kwargs) -> Tensor:
    if args:  # a caller passing more than the hidden states by position: the layer's own code
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    p, chain.pending = chain.pending, None
    if p is not None and p[0] is hidden_states and p[1] is layer.input_layernorm:
        x = p[2]
    else:
        x = layer.input_layernorm(hidden_states)
    a = layer.self_attn(hidden_states=x, **kwargs)[0]
    h, x = _add_norm(hidden_states, a, layer.post_attention_layernorm)
    m = layer.mlp(x)
    if nxt is None:
        return h + m
    out, normed = _add_norm(h, m, nxt)
    chain.pending = (out, nxt, normed)
    return out


def _llama_layer(m: torch.nn.Module) -> bool:
    """Exactly the four children of a Llama-style layer, whose norms run no other code than
    their class's (the fused path calls the post-attention norm's arithmetic directly)."""
    return ({k for k, _ in m.named_children()} == _LAYER_CHILDREN and "forward" not in m.__dict__
            and all(_llama_style(n) and not hooked(n)
                    for n in (m.input_layernorm, m.post_attention_layernorm)))


def _layer_matches(layer: torch.nn.Module) -> bool:
    """The fused forward reproduces the layer's own on a deterministic 3-token input, and the
    next norm it computes (here: the layer's own input norm) matches that norm of its output."""
    w = layer.post_attention_layernorm.weight
    n, d = w.shape[0], layer.self_attn.head_dim
    x = (torch.linspace(-2, 2, 3 * n, device=w.device).reshape(1, 3, n).roll(n // 3)).to(w.dtype)
    ang = torch.linspace(0, 3, 3 * (d // 2), device=w.device).reshape(1, 3, d // 2)
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(w.dtype) for f in (torch.cos, torch.sin))
    mask = torch.full((1, 1, 3, 3), torch.finfo(w.dtype).min, device=w.device).triu(1).to(w.dtype)
    kw = dict(attention_mask=mask, position_ids=torch.arange(3, device=w.device)[None],
              position_embeddings=(cos, sin))
    ref = type(layer).forward(layer, x, **kw)
    chain = _Chain()
    ours = _layer_forward(layer, chain, layer.input_layernorm, x, **kw)
    if not (isinstance(ref, Tensor) and ref.dtype == ours.dtype and chain.pending is not None):
        return False
    tol = 1e-5 if w.dtype == torch.float32 else 2 ** -6
    scale = ref.float().abs().max().clamp_min(1.0)
    return all(bool(((a.float() - b.float()).abs() <= tol * scale).all())
               for a, b in ((ours, ref), (chain.pending[2], layer.input_layernorm(ref))))


@contextmanager
def fused_residuals(blocks: list[torch.nn.Module]) -> Iterator[int]:
    """Inside the block the Llama-style decoder layers among `blocks` (in order) fold their
    residual adds into the norms that follow (see the module docstring); yields how many. Enter
    it before `fused_norms`: a norm whose forward is already replaced keeps its layer unfused."""
    verdict: dict[type, bool] = {}
    ok = []
    for b in blocks:
        good = _llama_layer(b)
        if good and type(b) not in verdict:
            try:
                with torch.no_grad():
                    verdict[type(b)] = _layer_matches(b)
            except Exception:  # another attention signature or output: the layer's own forward
                verdict[type(b)] = False
        ok.append(good and verdict[type(b)])
    chain, patched = _Chain(), []
    for i, b in enumerate(blocks):
        if ok[i]:
            nxt = blocks[i + 1].input_layernorm if i + 1 < len(blocks) and ok[i + 1] else None
            b.forward = functools.partial(_layer_forward, b, chain, nxt)
            patched.append(b)
    try:
        yield len(patched)
    finally:
        for b in patched:
            b.__dict__.pop("forward", None)
