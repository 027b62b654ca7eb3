"""Batched greedy generation with left padding and optional residual-stream edits.

Edits are forward pre-hooks on every decoder block (and the last block's output):
- ablation (Arditi et al. 2024): h <- h - (h . v) v at every position, removing a direction;
- addition: h <- h + alpha * v on the positions from t_post onwards (prompt tail and generated
  tokens), which pushes the model towards the concept of v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harc.chat import ChatFormat, left_pad
from harc.distributed import World
from harc.models import decoder_layers


@dataclass(frozen=True)
class Steer:
    """A residual edit: `mode` is "ablate" or "add"; `vectors` is [S, d] (unit per slot)."""

    mode: str
    vectors: Tensor
    alpha: float = 0.0
    slots: tuple[int, ...] | None = None  # None: every slot


@contextmanager
def steering(model, steer: Steer | None):
    """Apply `steer` to every forward pass inside the block (no-op for None)."""
    if steer is None:
        yield
        return
    blocks = decoder_layers(model)
    n = len(blocks)
    slots = steer.slots if steer.slots is not None else tuple(range(n + 1))
    handles = []

    def edit(h: Tensor, slot: int) -> Tensor:
        v = steer.vectors[slot].to(h.device, h.dtype)
        if steer.mode == "ablate":
            return h - (h @ v).unsqueeze(-1) * v
        if steer.mode == "add":
            # During incremental decoding only new tokens pass; on the prompt pass only the last.
            if h.shape[1] > 1:
                h = h.clone()
                h[:, -1] += steer.alpha * v
                return h
            return h + steer.alpha * v
        raise ValueError(f"unknown steering mode {steer.mode!r}")

    for slot in slots:
        if slot < n:
            def pre(_m, args, kwargs, slot=slot):
                if args:
                    return (edit(args[0], slot), *args[1:]), kwargs
                kwargs["hidden_states"] = edit(kwargs["hidden_states"], slot)
                return args, kwargs
            handles.append(blocks[slot].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m, _a, out, slot=slot):
                if isinstance(out, tuple):
                    return (edit(out[0], slot), *out[1:])
                return edit(out, slot)
            handles.append(blocks[-1].register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode_prompts(chat: ChatFormat, prompts: Sequence[str],
                   prefills: Sequence[str | None]) -> list[list[int]]:
    """Token ids of each prompt's generation input: the chat-rendered prompt, then its prefill."""
    return [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
            for p, f in zip(prompts, prefills)]


def length_order(encoded: Sequence[Sequence[int]]) -> list[int]:
    """Indices by increasing length (stable): `generate` batches them in this order."""
    return sorted(range(len(encoded)), key=lambda i: len(encoded[i]))


@torch.no_grad()
def generate(model, chat: ChatFormat, prompts: Sequence[str], *, max_new_tokens: int = 128,
             batch_size: int = 16, prefills: Sequence[str | None] | None = None,
             steer: Steer | None = None, progress: Callable[[int], None] | None = None
             ) -> list[str]:
    """Greedy completions for user prompts, optionally with a forced assistant prefix.

    A prefill is part of the returned text, so judges see what the user would see.
    Prompts are sorted by length so each batch pads little; outputs come back in input order.
    """
    tok = chat.tokenizer
    prefills = list(prefills) if prefills is not None else [None] * len(prompts)
    encoded = encode_prompts(chat, prompts, prefills)
    order = length_order(encoded)
    dev = next(model.parameters()).device
    # generation_config.eos_token_id is a list for Llama-3.1 / Qwen2.5-Instruct
    eos = (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
    eos_ids = sorted({e for t in eos if t is not None for e in (t if isinstance(t, list) else [t])})
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask, _ = left_pad([encoded[i] for i in idx], tok.pad_token_id, dev)
        with steering(model, steer):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 repetition_penalty=1.0,  # plain greedy (Qwen2.5 ships 1.05)
                                 eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
        for row, i in enumerate(idx):
            text = tok.decode(gen[row, ids.shape[1]:], skip_special_tokens=True)
            out[i] = (prefills[i] or "") + text
        if progress:
            progress(len(idx))
    return out


def generate_sharded(world: World, model, chat: ChatFormat, prompts: Sequence[str], *,
                     batch_size: int = 16, prefills: Sequence[str | None] | None = None,
                     **kw: Any) -> list[str]:
    """`generate` over the ranks: the length-sorted batches one process would run are dealt out,
    and every rank gets all completions in input order (the same text as one process)."""
    prefills = list(prefills) if prefills is not None else [None] * len(prompts)
    order = length_order(encode_prompts(chat, prompts, prefills))
    # This rank's share is still length-sorted, so `generate` forms exactly these batches.
    mine = world.shard(order, batch_size)
    outs = generate(model, chat, [prompts[i] for i in mine], prefills=[prefills[i] for i in mine],
                    batch_size=batch_size, **kw)
    out: list[str] = [""] * len(prompts)
    for i, o in zip(order, world.gather(outs, batch_size), strict=True):
        out[i] = o
    return out
