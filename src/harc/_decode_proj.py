"""Merged projections for harc's decoder: one GEMM per attention's q/k/v and per MLP's gate/up,
and SiLU-times-up in one Triton kernel.

Issue #12's batch-256 profile of a 7B model (docs/performance.md): the key and value projections
(512 output columns each) ran at about 100 TFLOP/s against 440 for the query's, and SiLU and the
product with `up` were two passes over the MLP's widest activations. Merged, the group of
projections reads its input once and fills the card in one launch.

`merged_projections(model)`: while decoding, the weights (and biases) of each group of plain
`nn.Linear` layers (an attention's q/k/v, an MLP's gate/up) share one storage, each parameter a row
view of it, so no memory is added. The group's first projection computes the whole group and the
others return their column slice when called with the same input; an MLP computes
`down(silu(gate) * up)` from the merged product, rounding where transformers rounds (the SiLU to
the input dtype, then the product). Each MLP class is checked against its own forward on a random
input first; modules with hooks, adapters, offloading or non-float weights keep their own path. On
exit every parameter gets its own storage back. `HARC_DECODE_PROJ=torch|triton` picks (default:
triton on CUDA); a failure warns once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harc._decode_attn import hooked, kernel_usable, record_failure

_broken: list[str] = []


def enabled(device: torch.device) -> bool:
    """Whether decoding on `device` should merge projections (HARC_DECODE_PROJ=triton, or unset
    on CUDA) and Triton imports."""
    return kernel_usable("HARC_DECODE_PROJ", device, _broken, _kernel, _fail)


def _fail(e: Exception) -> None:
    record_failure(_broken, e, "SiLU-product", "transformers' MLP")


def silu_mul(gu: Tensor) -> Tensor:
    """silu(g).to(dtype) * u, rounded to the dtype, for gu = [..., g | u] contiguous."""
    n = gu.shape[-1] // 2
    rows = gu.reshape(-1, 2 * n)
    out = rows.new_empty((rows.shape[0], n))
    block = min(1024, 1 << (n - 1).bit_length())
    _kernel()[(rows.shape[0], -(-n // block))](rows, out, n, BLOCK=block, num_warps=4)
    return out.view(*gu.shape[:-1], n)


def _plain(*mods: nn.Module) -> bool:
    """Plain float `nn.Linear` layers with one input size, one dtype and device, all biased or
    none, without hooks or offloading (whose forwards a merged GEMM would skip)."""
    if not all(type(m) is nn.Linear for m in mods):
        return False
    w0 = mods[0].weight
    return all(
        type(m.weight) is nn.Parameter and m.weight.is_floating_point() and not hooked(m)
        and m.weight.shape[1] == w0.shape[1] and m.weight.dtype == w0.dtype
        and m.weight.device == w0.device and (m.bias is None) == (mods[0].bias is None)
        for m in mods)


class _Group:
    """Linear layers whose parameters are row views of one weight (and bias) while merged."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        self.weight = torch.cat([m.weight.detach() for m in linears])
        self.bias = (None if linears[0].bias is None
                     else torch.cat([m.bias.detach() for m in linears]))
        off = 0
        for m, n in zip(linears, self.sizes):
            m.weight.data = self.weight[off:off + n]  # the old storage is freed
            if self.bias is not None:
                m.bias.data = self.bias[off:off + n]
            off += n
        self.pending: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def split(self) -> None:
        """Each parameter back on its own storage (one layer's worth of extra memory at a time)."""
        for m in self.linears:
            m.weight.data = m.weight.data.clone()
            if m.bias is not None:
                m.bias.data = m.bias.data.clone()
        self.weight = self.bias = self.pending = None


def _lead(group: _Group, x: Tensor) -> Tensor:
    """The group's first projection: computes all, keeps the others' slices for this input."""
    outs = group(x).split(group.sizes, -1)
    group.pending = (x, outs[1:])
    return outs[0]


def _follow(group: _Group, i: int, x: Tensor) -> Tensor:
    """Projection i + 1 of the group: its slice when called with the lead's input, else its own."""
    p = group.pending
    if p is not None and p[0] is x:
        if i == len(p[1]) - 1:
            group.pending = None
        return p[1][i]
    m = group.linears[i + 1]
    return F.linear(x, m.weight, m.bias)


def _mlp_forward(module: nn.Module, group: _Group, x: Tensor) -> Tensor:
    gu = group(x)
    if not _broken:
        try:
            return module.down_proj(silu_mul(gu))
        except Exception as e:  # compilation or launch: transformers' arithmetic from now on
            _fail(e)
    g, u = gu.split(group.sizes, -1)
    return module.down_proj(module.act_fn(g) * u)


def _mlp_matches(module: nn.Module, group: _Group) -> bool:
    """The merged forward reproduces the module's own on a deterministic input (within
    rounding)."""
    w = group.weight
    n = w.shape[1]
    x = (torch.linspace(-3, 3, 3 * n, device=w.device).reshape(3, n).roll(n // 3)).to(w.dtype)
    ref = type(module).forward(module, x)
    ours = _mlp_forward(module, group, x)
    tol = 1e-4 if w.dtype == torch.float32 else 2 ** -5
    scale = ref.float().abs().max().clamp_min(1.0)
    return ref.dtype == ours.dtype and bool(((ours.float() - ref.float()).abs() <= tol * scale).all())


def _mlp(m: nn.Module) -> list[nn.Linear] | None:
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(isinstance(getattr(m, k, None), nn.Module) for k in names) or hooked(m) \
            or not isinstance(getattr(m, "act_fn", None), nn.Module) or hooked(m.act_fn):
        return None
    gate, up = m.gate_proj, m.up_proj
    return [gate, up] if _plain(gate, up) and gate.out_features == up.out_features else None


def _qkv(m: nn.Module) -> list[nn.Linear] | None:
    if not type(m).__name__.endswith("Attention") or hooked(m):
        return None
    mods = [getattr(m, k, None) for k in ("q_proj", "k_proj", "v_proj")]
    return mods if all(isinstance(x, nn.Module) for x in mods) and _plain(*mods) else None


@contextmanager
def merged_projections(model: nn.Module) -> Iterator[int]:
    """Inside the block the model's q/k/v and gate/up groups run as one GEMM each (see the module
    docstring); yields how many groups were merged."""
    groups: list[_Group] = []
    patched: list[nn.Module] = []  # modules whose forward is replaced
    verdict: dict[type, bool] = {}
    try:
        with torch.no_grad():
            for m in list(model.modules()):
                if (lin := _mlp(m)) is not None:
                    if not verdict.get(type(m), True):
                        continue
                    g = _Group(lin)
                    groups.append(g)  # restored on the way out, whatever happens next
                    if type(m) not in verdict:
                        verdict[type(m)] = _mlp_matches(m, g)
                    if not verdict[type(m)]:  # e.g. another activation: its own storage back
                        groups.pop().split()
                        continue
                    m.forward = functools.partial(_mlp_forward, m, g)
                    patched.append(m)
                elif (lin := _qkv(m)) is not None:
                    g = _Group(lin)
                    groups.append(g)
                    lin[0].forward = functools.partial(_lead, g)
                    for i, f in enumerate(lin[1:]):
                        f.forward = functools.partial(_follow, g, i)
                    patched.extend(lin)
    except Exception as e:  # compilation or launch: keep transformers' projections
        _fail(e)
        _restore(groups, patched)
        groups, patched = [], []
    try:
        yield len(groups)
    finally:
        _restore(groups, patched)


def _restore(groups: list[_Group], patched: list[nn.Module]) -> None:
    for m in patched:
        m.__dict__.pop("forward", None)
    with torch.no_grad():
        for g in groups:
            g.split()


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use (see harc._decode_attn._kernels)."""
    global tl  # the interpreter looks the language module up in the kernel's globals
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul_rows(GU, OUT, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(GU + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(GU + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        dt = OUT.dtype.element_ty
        s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # transformers rounds the SiLU first
        tl.store(OUT + row * n + cols, (s * u).to(dt), mask=mask)

    return silu_mul_rows
