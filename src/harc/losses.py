"""The four HARC loss terms (HARC-METHOD §4), on tensors only (no model, no tokenizer).

Conventions: `is_harmful` is a [B] bool mask; retain rows (harmless and pseudo-harmful) are the
others. Directions are detached here, so only the residuals carry gradient. A term with no samples
is 0 (never NaN), because micro-batches may lack a category.

Logit-level terms come in two forms: on given logits (`kl_retain`, `refusal_ce`, the reference for
tests) and on final hidden states through the LM head in chunks (`head_kl_retain`,
`head_refusal_ce`), which never hold full-vocabulary float32 logits for more than one chunk and
recompute each chunk in the backward pass instead of keeping it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _zero(like: Tensor) -> Tensor:
    return like.new_zeros((), dtype=torch.float32)


def projections(x: Tensor, v: Tensor) -> Tensor:
    """cos(x[l, ...], v[l]) as [L, ...] float32; x is [L, B, d] (or [L, W, B, d]), v is [L, d]
    (detached)."""
    v = v.detach().to(x.device, torch.float32)
    v = v.view(v.shape[0], *([1] * (x.dim() - 2)), v.shape[1])
    return F.cosine_similarity(x.float(), v, dim=-1, eps=1e-8)


def coupling_hinge(p_r: Tensor, p_h: Tensor, is_harmful: Tensor, margin: float) -> Tensor:
    """Per-layer, per-sample hinge [L, B].

    Harmful rows want both projections at least `margin`: relu(m - p_r) + relu(m - p_h).
    Retain rows want both non-positive: relu(p_r) + relu(p_h).
    """
    harmful = is_harmful.to(p_r.device).unsqueeze(0)
    pos = F.relu(margin - p_r) + F.relu(margin - p_h)
    neg = F.relu(p_r) + F.relu(p_h)
    return torch.where(harmful, pos, neg)


def _mean_samples_then_layers(per: Tensor) -> Tensor:
    if per.numel() == 0:
        return _zero(per)
    return per.mean(dim=1).mean()


def coupling_loss(p_r: Tensor, p_h: Tensor, is_harmful: Tensor, margin: float, *,
                  valid: Tensor | None = None, hard_frac: float = 1.0) -> Tensor:
    """Hinge averaged over samples, then over layers; p_r, p_h are [L, B] cosines.

    valid [B] bool: only these samples count. hard_frac < 1: average only the hardest fraction
    of each layer's samples (`hard_mean`). The defaults give the paper's plain mean.
    """
    per = coupling_hinge(p_r, p_h, is_harmful, margin)
    if valid is None and hard_frac == 1.0:
        return _mean_samples_then_layers(per)
    return hard_mean(per, hard_frac, valid)


def prompt_coupling(h_inst: Tensor, h_post: Tensor, v_harm: Tensor, v_ref: Tensor,
                    is_harmful: Tensor, margin: float, *, p_harm: Tensor | None = None,
                    hard_frac: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Prompt-side coupling: p_r = cos(h(t_post), v_ref), p_h = cos(h(t_inst), v_harm).

    h_* are [L, B, d] residuals at the selected layers, v_* the [L, d] directions there.
    p_harm: a harmfulness reading [L, B] taken elsewhere (`read_projection`) instead of the one
    at t_inst. Returns (loss, p_r, p_h) with the [L, B] cosines for logging.
    """
    p_r = projections(h_post, v_ref)
    p_h = projections(h_inst, v_harm) if p_harm is None else p_harm
    return coupling_loss(p_r, p_h, is_harmful, margin, hard_frac=hard_frac), p_r, p_h


def response_coupling(h_resp: Tensor, v_harm_resp: Tensor, v_ref_resp: Tensor,
                      is_harmful: Tensor, margin: float, *, valid: Tensor | None = None,
                      hard_frac: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Response-side coupling on the window-mean residual h_resp [L, B, d] of the training response:
    p_r = cos(h_resp, v_ref_resp), p_h = cos(h_resp, v_harm_resp). Returns (loss, p_r, p_h).

    Several windows per row: h_resp [L, W, B, d] with `valid` [W, B] (windows that lie inside the
    response); every valid (window, row) pair is one sample. The returned cosines are window 0's.
    """
    p_r, p_h = projections(h_resp, v_ref_resp), projections(h_resp, v_harm_resp)
    if h_resp.dim() == 3:
        return coupling_loss(p_r, p_h, is_harmful, margin, hard_frac=hard_frac), p_r, p_h
    L, W, B = p_r.shape
    loss = coupling_loss(p_r.reshape(L, W * B), p_h.reshape(L, W * B), is_harmful.repeat(W),
                         margin, valid=None if valid is None else valid.reshape(W * B),
                         hard_frac=hard_frac)
    return loss, p_r[:, 0], p_h[:, 0]


# ---- opt-in variants (HarcConfig keys); each reduces to the paper's term at its default.

READS = ("max", "softmax")


def read_projection(p_tok: Tensor, mask: Tensor, mode: str, temp: float = 0.1) -> Tensor:
    """One harmfulness reading per row from several positions: p_tok [L, B, T] cosines, mask
    [B, T] (true where read; every row reads at least one position).

    "max": the largest cosine. "softmax": sum_t softmax(p/temp)_t * p_t over the read positions,
    a soft maximum that lies between their mean (temp -> inf) and their maximum (temp -> 0).
    """
    if mode not in READS:
        raise ValueError(f"read mode must be one of {READS}, got {mode!r}")
    m = mask.to(p_tok.device, torch.bool).unsqueeze(0)
    masked = p_tok.float().masked_fill(~m, float("-inf"))
    if mode == "max":
        return masked.amax(-1)
    w = torch.softmax(masked / temp, dim=-1)
    return (w * p_tok.float().masked_fill(~m, 0.0)).sum(-1)


def hard_mean(per: Tensor, frac: float, valid: Tensor | None = None) -> Tensor:
    """Mean of the hardest ceil(frac * n) values of each layer's row [L, N] (n = its valid
    entries; `valid` [N] bool, default all), then over layers; frac 1 is the plain mean over the
    valid entries, and a layer with no valid entry gives 0. Sorting (no Python-side count) keeps
    it free of device syncs."""
    valid = torch.ones(per.shape[-1], dtype=torch.bool, device=per.device) if valid is None \
        else valid.to(per.device)
    if per.numel() == 0:
        return _zero(per)
    n = valid.sum()
    k = torch.ceil(frac * n.float()).clamp(min=1.0)
    ranked = per.float().masked_fill(~valid.unsqueeze(0), float("-inf")).sort(-1, descending=True)
    take = torch.arange(per.shape[-1], device=per.device).unsqueeze(0) < k
    vals = ranked.values.masked_fill(~take | ranked.values.isinf(), 0.0)
    return torch.where(n > 0, vals.sum(-1) / k, 0.0).mean()


def pseudo_refusal(p_r: Tensor, is_pseudo: Tensor, margin: float) -> Tensor:
    """Keeps pseudo-harmful rows on the non-refusing side of v_ref with a margin:
    relu(p_r + margin) averaged over the pseudo rows ([B] bool), then over layers; 0 without any."""
    w = is_pseudo.to(p_r.device, torch.float32).unsqueeze(0)
    per = F.relu(p_r.float() + margin) * w
    return (per.sum(-1) / w.sum(-1).clamp(min=1.0)).mean() if p_r.numel() else _zero(p_r)


def kl_retain(adapted_logits: Tensor, base_logits: Tensor) -> Tensor:
    """Token-mean KL(base || adapted) over N response positions; logits are [N, V]."""
    if adapted_logits.shape[0] == 0:
        return _zero(adapted_logits)
    lp = adapted_logits.float().log_softmax(-1)
    lb = base_logits.float().log_softmax(-1)
    return F.kl_div(lp, lb, log_target=True, reduction="sum") / adapted_logits.shape[0]


def refusal_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Token-mean next-token cross-entropy; logits [N, V] predict targets [N]."""
    if logits.shape[0] == 0:
        return _zero(logits)
    return F.cross_entropy(logits.float(), targets, reduction="mean")


Head = Callable[[Tensor], Tensor]


def _ce_chunk(head: Head, h: Tensor, targets: Tensor) -> Tensor:
    # The head runs in the model dtype (a bf16 matmul); the softmax reduction is float32.
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def _kl_chunk(head: Head, h: Tensor, h_base: Tensor) -> Tensor:
    lp = head(h).float().log_softmax(-1)
    with torch.no_grad():
        lb = head(h_base).float().log_softmax(-1)
    return F.kl_div(lp, lb, log_target=True, reduction="sum")


def _chunked_sum(fn, head: Head, a: Tensor, b: Tensor, chunk: int) -> Tensor:
    total = _zero(a)
    for i in range(0, a.shape[0], chunk):
        args = (head, a[i: i + chunk], b[i: i + chunk])
        if torch.is_grad_enabled() and a.requires_grad:
            # Keep only the chunk's hidden states for backward; its logits are recomputed.
            total = total + checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + fn(*args)
    return total


def head_refusal_ce(head: Head, h: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """`refusal_ce(head(h), targets)` computed `chunk` positions at a time; h is [N, d]."""
    if h.shape[0] == 0:
        return _zero(h)
    return _chunked_sum(_ce_chunk, head, h, targets, chunk) / h.shape[0]


def head_kl_retain(head: Head, h: Tensor, h_base: Tensor, chunk: int = 1024) -> Tensor:
    """`kl_retain(head(h), head(h_base))` computed in chunks; h_base carries no gradient."""
    if h.shape[0] == 0:
        return _zero(h)
    return _chunked_sum(_kl_chunk, head, h, h_base.detach(), chunk) / h.shape[0]


def total_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Weighted sum of the named terms (§4: couple 1, couple_resp 1, kl 10, ce 1)."""
    return sum(weights[k] * terms[k] for k in weights)
