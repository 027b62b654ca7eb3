"""Pieces of HARC's opt-in improvements that are not the micro-step: v_harm extracted where it is
read, the random-direction control, framed and recovery rows and on-policy pseudo-harmful
variants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.activations import MeanAccumulator, iter_read_acts
from harc.chat import ChatFormat
from harc.data import load
from harc.errors import HarcError
from harc.synth import pseudo_frames, synth_pseudo

# Sets no synthesised pseudo-harmful prompt may come near, on top of the evaluation prompts the
# caller passes: XSTest (harc keeps it held out for evaluation) and harc's own pseudo-harmful set
# less the training prompts (its other half is evaluated).
DISJOINT_FROM = ("xstest", "harc-pseudo-harmful")


def read_direction(model, chat: ChatFormat, harmful: Sequence[str], harmless: Sequence[str],
                   seed: Tensor, *, mode: str, boundaries: bool, temp: float = 0.1,
                   batch_size: int = 16, slots: Sequence[int] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """(unit [S, d], raw norm [S]) of mean(harmful) - mean(harmless) residuals taken where each
    slot's harmfulness is read (`iter_read_acts`), the read positions located with `seed` [S, d];
    S = every slot, or the given `slots` (then `seed` holds their directions, in that order)."""
    slots = list(range(seed.shape[0])) if slots is None else list(slots)
    means = []
    for prompts in (harmful, harmless):
        acc = MeanAccumulator()
        for x in iter_read_acts(model, chat, prompts, seed, slots=slots, mode=mode,
                                boundaries=boundaries, temp=temp, batch_size=batch_size):
            acc.add({"h": x})
        means.append(acc.mean("h"))
    diff = means[0] - means[1]
    norm = diff.norm(dim=-1)
    return diff / norm.clamp(min=1e-12).unsqueeze(-1), norm


def random_directions(n_slots: int, hidden: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two [S, d] sets of seeded random unit vectors (for v_harm and v_harm_resp)."""
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    return tuple(F.normalize(torch.randn(n_slots, hidden, generator=g), dim=-1) for _ in range(2))


def recovery_rows(harmful: Sequence[Mapping], tokenizer, ks: Sequence[int]) -> list[dict]:
    """One row per harmful record with a completion: its first k tokens as a prefill before the
    refusal, k cycling through `ks` (the opening is context only: never a CE target)."""
    rows = []
    recs = [r for r in harmful if isinstance(r.get("completion"), str) and r["completion"].strip()]
    for i, r in enumerate(recs):
        ids = tokenizer(r["completion"], add_special_tokens=False)["input_ids"][: ks[i % len(ks)]]
        opening = tokenizer.decode(ids)
        if opening.strip():
            rows.append({"prompt": r["prompt"], "refusal": r["refusal"], "prefill": opening})
    return rows


def framed_rows(harmful: Sequence[Mapping], n: int, seed: int = 0) -> list[dict]:
    """`n` copies of each harmful record with its prompt in a benign framing (`pseudo_frames`,
    seeded apart from the pseudo-harmful variants), keeping its refusal target."""
    framed = pseudo_frames([r["prompt"] for r in harmful], n, seed + 1)
    return [{"prompt": f, "refusal": r["refusal"]}
            for r, fs in zip(harmful, framed, strict=True) for f in fs]


def augment_pseudo(model, chat: ChatFormat, pseudo: Sequence[Mapping], n: int, *,
                   exclude: Sequence[str] = (), seed: int = 0, max_new_tokens: int = 128,
                   batch_size: int = 16) -> list[dict]:
    """`n` on-policy variants per pseudo-harmful training prompt, answered by `model` (refusals
    dropped), none near an `exclude` prompt or a `DISJOINT_FROM` prompt that is not one of the
    training prompts themselves."""
    sources = [r["prompt"] for r in pseudo]
    reference, own = list(exclude), set(sources)
    for name in DISJOINT_FROM:
        try:
            reference += [r["prompt"] for r in load(name) if r["prompt"] not in own]
        except HarcError as e:
            raise HarcError(f"pseudo_augment keeps new prompts disjoint from {name}, which could "
                            f"not be loaded ({e}); run `harc data fetch {name}` first") from None
    pairs, _ = synth_pseudo(model, chat, sources, n, exclude=reference, seed=seed,
                            max_new_tokens=max_new_tokens, batch_size=batch_size)
    return pairs
