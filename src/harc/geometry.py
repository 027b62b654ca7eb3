"""Per-layer geometry of the four directions, the held-out projection check and the points of
the harmfulness-refusal plane (HARC-METHOD §2-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harc.chat import ChatFormat
from harc.directions import NAMES, Directions, prompt_projections
from harc.layers import band_mask, layer_scores, select_layers


def geometry(d: Directions, k: int = 4, score: str = "variant_d", low: int = 4,
             high_offset: int = 4) -> dict:
    """Per-slot cosines (with the bootstrap interval), both scores, band and top-k layers."""
    mean, lo, hi = d.bootstrap_interval()
    band = band_mask(d.n_slots, low, high_offset)
    n_band = int(band.sum())
    k = min(k, n_band) if n_band else 0
    cross = torch.stack([torch.stack([d.cos(a, b) for b in NAMES], -1) for a in NAMES], -2)
    return {
        "n_slots": d.n_slots,
        "cos_ref_harm": d.cos("v_ref", "v_harm").tolist(),
        "ci_mean": mean.tolist(), "ci_lo": lo.tolist(), "ci_hi": hi.tolist(),
        "cos_harm_resp_pair": d.cos("v_harm_resp", "v_ref_resp").tolist(),
        "cos_harm_cross": d.cos("v_harm", "v_harm_resp").tolist(),
        "cos_ref_cross": d.cos("v_ref", "v_ref_resp").tolist(),
        "score_variant_d": layer_scores(d, "variant_d").tolist(),
        "score_legacy": layer_scores(d, "legacy").tolist(),
        "band": [int(i) for i in torch.nonzero(band).flatten()],
        "score": score,
        "selected_layers": select_layers(d, k, score, low, high_offset) if k else [],
        "cross_cos": cross.tolist(),  # [S, 4, 4] in NAMES order
    }


def heldout_check(model, chat: ChatFormat, d: Directions, harmful: Sequence[str],
                  harmless: Sequence[str], layers: Sequence[int], batch_size: int = 16) -> dict:
    """Mean cosine of held-out harmful vs harmless prompts with v_harm (t_inst) and v_ref (t_post)
    on the selected layers: the separation the coupling relies on."""
    ph = prompt_projections(model, chat, harmful, d, layers, batch_size)
    pb = prompt_projections(model, chat, harmless, d, layers, batch_size)
    out = {"layers": list(layers), "n_harmful": len(harmful), "n_harmless": len(harmless)}
    for j, name in enumerate(("harm_inst", "ref_post")):
        h, b = ph[..., j].mean().item(), pb[..., j].mean().item()
        out[name] = {"harmful": h, "harmless": b, "gap": h - b}
    return out


def plane_points(model, chat: ChatFormat, d: Directions, sets: dict[str, Sequence[str]],
                 layer: int, batch_size: int = 16) -> dict[str, list[list[float]]]:
    """x = cos(h(t_inst), v_harm), y = cos(h(t_post), v_ref) at `layer`, per named prompt set."""
    return {name: prompt_projections(model, chat, prompts, d, [layer], batch_size)[:, 0].tolist()
            for name, prompts in sets.items() if prompts}
