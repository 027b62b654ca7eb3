"""Batched greedy generation with optional residual-stream edits and a runtime monitor.

`generate` runs harc's decoder (`harc._decode`: static slot cache, continuous batching, shared
prefix reuse, CUDA-graph decode steps) and falls back to transformers' `generate` for models that
do not run through it; `generate_hf` is that reference engine, kept for the fallback and for
comparisons. Both are plain greedy and agree token for token up to floating-point rounding.

Edits are forward pre-hooks on every decoder block (and the last block's output):
- ablation (Arditi et al. 2024): h <- h - (h . v) v at every position, removing a direction;
- addition: h <- h + alpha * v on the positions from t_post onwards (prompt tail and generated
  tokens), which pushes the model towards the concept of v.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from harc.chat import ChatFormat, left_pad
from harc.distributed import World
from harc.errors import HarcError
from harc.models import decoder_layers, unwrap

Finish = Callable[[list[int], list[list[int]], list[bool]], None]


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


class Monitor(Protocol):
    """A runtime latent guard: at every decode step it sees the residual stream entering decoder
    block `slot` (the last block's output for slot == n_layers) at each row's newest generated
    token, `h` [B, d], with `rows` the prompt indices of those rows, and returns a [B] bool tensor
    of rows to stop; a stopped row's text becomes `replacement`."""

    slot: int
    replacement: str

    def __call__(self, h: Tensor, rows: list[int]) -> Tensor: ...


def eos_token_ids(model, tok) -> list[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids (a list for Llama-3.1 and
    Qwen2.5-Instruct)."""
    eos = (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
    return sorted({e for t in eos if t is not None for e in (t if isinstance(t, list) else [t])})


def _encode(chat: ChatFormat, prompts: Sequence[str], prefills) -> tuple[list, list[list[int]]]:
    prefills = list(prefills) if prefills is not None else [None] * len(prompts)
    encoded = [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
               for p, f in zip(prompts, prefills)]
    return prefills, encoded


@torch.no_grad()
def generate(model, chat: ChatFormat, prompts: Sequence[str], *, max_new_tokens: int = 128,
             batch_size: int = 16, prefills: Sequence[str | None] | None = None,
             steer: Steer | None = None, progress: Callable[[int], None] | None = None,
             on_done: Callable[[list[int], list[str]], None] | None = None,
             monitor: Monitor | None = None) -> list[str]:
    """Greedy completions for user prompts, optionally with a forced assistant prefix.

    A prefill is part of the returned text, so judges see what the user would see. Hand the whole
    request set to one call: prompts are scheduled shortest first, `batch_size` rows are decoded
    at a time and a finished row's slot takes the next prompt. `on_done(indices, texts)` and
    `progress(n)` are called as rows finish (indices into `prompts`), so callers can persist
    results incrementally; outputs come back in input order.
    """
    tok = chat.tokenizer
    prefills, encoded = _encode(chat, prompts, prefills)
    out = [""] * len(prompts)

    def finish(rows: list[int], toks: list[list[int]], stopped: list[bool]) -> None:
        texts = [monitor.replacement if stop
                 else (prefills[i] or "") + tok.decode(t, skip_special_tokens=True)
                 for i, t, stop in zip(rows, toks, stopped)]
        for i, text in zip(rows, texts):
            out[i] = text
        if on_done:
            on_done(list(rows), texts)
        if progress:
            progress(len(rows))

    with steering(model, steer):
        # The "add" edit marks each prompt's last token, which a shared-prefix pass would move,
        # and hooks holding CPU tensors cannot be graph-captured: steered runs decode eagerly.
        generate_tokens(model, encoded, eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, finish=finish,
                        monitor=monitor, prefix_reuse=steer is None,
                        graphs=False if steer is not None else None)
    return out


@contextmanager
def _attention_impl(model, name: str) -> Iterator[None]:
    cfg = unwrap(model).config
    old = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = old


@torch.no_grad()
def generate_tokens(model, seqs: list[list[int]], *, eos_ids: list[int], pad_id: int | None,
                    max_new_tokens: int, batch_size: int, finish: Finish,
                    monitor: Monitor | None = None, prefix_reuse: bool = True,
                    graphs: bool | None = None) -> dict:
    """Greedy continuations of token sequences through harc's decoder; returns its statistics.

    `graphs` (default: on CUDA without a monitor) captures decode steps as CUDA graphs. Models the
    decoder cannot run get transformers' `generate`, with one warning.
    """
    # The decoder imports transformers (seconds); loaded only when something is generated.
    from harc._decode import ATTN, Engine, Unsupported

    if max_new_tokens < 1:
        raise HarcError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if batch_size < 1:
        raise HarcError(f"batch_size must be positive, got {batch_size}")
    dev = next(model.parameters()).device
    if graphs is None:
        graphs = dev.type == "cuda" and monitor is None
    finished: set[int] = set()

    def track(rows: list[int], toks: list[list[int]], stopped: list[bool]) -> None:
        finished.update(rows)
        finish(rows, toks, stopped)

    engine = Engine(model, max_new_tokens=max_new_tokens, slots=batch_size, eos_ids=eos_ids,
                    graphs=graphs, monitor=monitor, prefix_reuse=prefix_reuse)
    try:
        with _attention_impl(model, ATTN):
            engine.run(seqs, track)
        return engine.stats
    except Unsupported as e:
        if monitor is not None:
            raise HarcError(f"the runtime monitor needs harc's decoder, which cannot run this "
                            f"model ({e})") from e
        warnings.warn(f"harc's decoder cannot run this model ({e}); using transformers' generate",
                      stacklevel=2)
    rest = [i for i in range(len(seqs)) if i not in finished]
    generate_tokens_hf(model, [seqs[i] for i in rest], eos_ids=eos_ids, pad_id=pad_id,
                       max_new_tokens=max_new_tokens, batch_size=batch_size,
                       finish=lambda rows, toks, st: finish([rest[r] for r in rows], toks, st))
    return {"fallback": True}


@torch.no_grad()
def generate_tokens_hf(model, seqs: list[list[int]], *, eos_ids: list[int], pad_id: int | None,
                       max_new_tokens: int, batch_size: int, finish: Finish) -> None:
    """The reference engine: transformers' `generate` on length-sorted chunks of `batch_size`,
    left-padded; each chunk runs until its last row stops."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    dev = next(model.parameters()).device
    pad = pad_id if pad_id is not None else 0
    stop = set(eos_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        ids, mask, _ = left_pad([seqs[i] for i in idx], pad, dev)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             repetition_penalty=1.0,  # plain greedy (Qwen2.5 ships 1.05)
                             eos_token_id=eos_ids, pad_token_id=pad)  # [] overrides the model's
        toks = []
        for row in gen[:, ids.shape[1]:].tolist():  # rows that stopped early are padded after EOS
            end = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
            toks.append(row[:end])
        finish(idx, toks, [False] * len(idx))


@torch.no_grad()
def generate_hf(model, chat: ChatFormat, prompts: Sequence[str], *, max_new_tokens: int = 128,
                batch_size: int = 16, prefills: Sequence[str | None] | None = None,
                steer: Steer | None = None) -> list[str]:
    """`generate` through the reference engine (transformers' `generate` per chunk)."""
    tok = chat.tokenizer
    prefills, encoded = _encode(chat, prompts, prefills)
    out = [""] * len(prompts)

    def finish(rows, toks, _stopped):
        for i, t in zip(rows, toks):
            out[i] = (prefills[i] or "") + tok.decode(t, skip_special_tokens=True)

    with steering(model, steer):
        generate_tokens_hf(model, encoded, eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, finish=finish)
    return out


def generate_sharded(world: World, model, chat: ChatFormat, prompts: Sequence[str], *,
                     batch_size: int = 16, prefills: Sequence[str | None] | None = None,
                     **kw: Any) -> list[str]:
    """`generate` over the ranks: each rank decodes its share of the prompts (blocks of one batch,
    dealt round-robin), and every rank gets all completions in input order. Greedy rows do not
    depend on which rows share their batch, so the text is the one a single process produces."""
    prefills = list(prefills) if prefills is not None else [None] * len(prompts)
    idx = world.shard(list(range(len(prompts))), batch_size)
    outs = generate(model, chat, [prompts[i] for i in idx], prefills=[prefills[i] for i in idx],
                    batch_size=batch_size, **kw) if idx else []
    return world.gather(outs, batch_size)
