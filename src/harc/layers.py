"""Layer selection scores (HARC-METHOD §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from harc.directions import Directions

SCORES = ("variant_d", "legacy")


def variant_d_score(d: Directions) -> Tensor:
    """(1-|cos(ref,harm)|)(1-|cos(ref_resp,harm_resp)|)|cos(harm,harm_resp)||cos(ref,ref_resp)|.

    High where the two concepts are separate on each side yet each concept is shared across the
    prompt and response positions: the reference code's score.
    """
    return ((1 - d.cos("v_ref", "v_harm").abs()) * (1 - d.cos("v_ref_resp", "v_harm_resp").abs())
            * d.cos("v_harm", "v_harm_resp").abs() * d.cos("v_ref", "v_ref_resp").abs())


def legacy_score(d: Directions) -> Tensor:
    """(1-|cos(v_ref,v_harm)|) * sqrt(|raw v_ref| * |raw v_harm|): the documented older score."""
    return (1 - d.cos("v_ref", "v_harm").abs()) * (d.norms["v_ref"] * d.norms["v_harm"]).sqrt()


def layer_scores(d: Directions, score: str = "variant_d") -> Tensor:
    if score == "variant_d":
        return variant_d_score(d)
    if score == "legacy":
        return legacy_score(d)
    raise ValueError(f"unknown layer score {score!r}; choose one of {SCORES}")


def band_mask(n_slots: int, low: int = 4, high_offset: int = 4) -> Tensor:
    """True for slots l with low <= l <= n - high_offset, n = number of decoder layers."""
    n_layers = n_slots - 1
    idx = torch.arange(n_slots)
    return (idx >= low) & (idx <= n_layers - high_offset)


def select_layers(d: Directions, k: int, score: str = "variant_d", low: int = 4,
                  high_offset: int = 4) -> list[int]:
    """Top-k slots by score inside the band (outside gets -inf), returned sorted."""
    s = layer_scores(d, score).clone()
    mask = band_mask(d.n_slots, low, high_offset)
    if int(mask.sum()) < k:
        raise ValueError(f"only {int(mask.sum())} layers lie in the band [{low}, n-{high_offset}]"
                         f" but k={k}; lower k or widen the band")
    s[~mask] = float("-inf")
    s = torch.nan_to_num(s, nan=float("-inf"))
    return sorted(torch.topk(s, k).indices.tolist())


def ramp_k(step: int, k_start: int = 2, k_final: int = 4, ramp_step: int = 1000) -> int:
    """K = k_start before `ramp_step`, k_final from it on (the reference's ramp)."""
    return k_final if step >= ramp_step else k_start


def plane_layer(selected: Sequence[int]) -> int | None:
    """The layer the harmfulness-refusal plane, the latent filter and the latent judge read: the
    middle of the selected layers."""
    return selected[len(selected) // 2] if selected else None
