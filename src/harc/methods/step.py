"""Pieces of a training step that every method shares: the decoder backbone and LM head, mixed
precision without PEFT's input copies, the KL reference forward (same weights, adapter off, one
copy in memory), compiled blocks and activation checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from itertools import accumulate

import torch
from torch import Tensor

from harc.errors import HarcError
from harc.lora import adapter_disabled, input_casting_off
from harc.methods.batching import MicroBatch
from harc.models import decoder_layers, unwrap


def backbone(model):
    """The decoder stack without the LM head: its output is the final (normed) hidden state."""
    base = unwrap(model)
    body = getattr(base, "base_model", None)
    if body is None or body is base:
        raise HarcError(f"{type(base).__name__} has no separate decoder backbone and LM head")
    return body


def lm_head(model):
    """The LM head as a function of hidden states (with Gemma-2 style logit soft-capping)."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(h: Tensor) -> Tensor:
        return torch.tanh(head(h) / cap) * cap
    return capped


def _half_on_cuda(model) -> bool:
    dev = next(model.parameters()).device
    return dev.type == "cuda" and unwrap(model).dtype in (torch.bfloat16, torch.float16)


def autocast(model):
    """bf16/fp16 models on CUDA run under autocast with PEFT's input casting off (see
    `no_input_cast`): the LoRA weights stay float32 for the optimizer, their matmuls run in bf16."""
    if not _half_on_cuda(model):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=unwrap(model).dtype)


def no_input_cast(model):
    """PEFT would copy each projection input to float32 for the float32 LoRA weights, and keep
    that copy for backward (about 60% more activation memory at 7B scale); autocast makes it
    unnecessary. Held across backward, so that checkpoint recomputation replays the same ops."""
    if not _half_on_cuda(model):
        return contextlib.nullcontext()
    return input_casting_off(model)


@contextlib.contextmanager
def compiled_blocks(model, on: bool = True):
    """Within the block, every decoder block's forward runs through torch.compile. The capture
    hooks stay outside the compiled region; the blocks share one code object, so a few graphs
    (with and without grad) serve them all, and dynamic shapes spare a recompile per batch width."""
    blocks = list(decoder_layers(model)) if on else []
    before = [vars(b).get("forward") for b in blocks]
    for b in blocks:
        b.forward = torch.compile(b.forward, dynamic=True)
    try:
        # A block that fails to compile runs eagerly (with a warning) instead of ending the run.
        # A graph per grad mode x adapter on/off x one-row batch x checkpointing, per LoRA class:
        # a bench run of a step variant (since reverted) logged 9, past dynamo's default limit of
        # 8 per function, after which a block silently runs eagerly.
        with (torch._dynamo.config.patch(suppress_errors=True, recompile_limit=64) if on
              else contextlib.nullcontext()):
            yield
    finally:
        for b, f in zip(blocks, before, strict=True):
            if f is None:
                del b.forward
            else:
                b.forward = f


def set_checkpointing(model, on: bool) -> None:
    """Turn (non-reentrant) activation checkpointing of the decoder blocks on or off.

    Non-reentrant checkpointing runs the forward with autograd on, so the coupling hooks' captures
    stay in the graph; input embeddings are made to require grad, as PEFT needs for the reentrant
    variant, so that either kind works."""
    base = unwrap(model)
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.enable_input_require_grads()
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


@torch.no_grad()
def kl_reference(model, mb: MicroBatch, cache: KLCache | None = None) -> Tensor | None:
    """Final hidden states of the base model (adapter off) at the KL positions of retain rows;
    None when the micro-batch has none. Runs on the retain rows only, trimmed of their common
    left padding; with `cache`, only on the rows it does not hold yet."""
    if not mb.kl_rows.numel():
        return None
    if cache is not None:
        return cache.reference(model, mb)
    return _base_states(model, mb, mb.retain_rows)[mb.kl_sub_rows, mb.kl_cols - mb.retain_trim]


def _base_states(model, mb: MicroBatch, rows: Tensor) -> Tensor:
    """Final hidden states of the base model (adapter off) for `rows` of `mb` (retain rows),
    without the columns that are padding in every retain row."""
    trim = mb.retain_trim
    with adapter_disabled(model), autocast(model):
        return backbone(model)(input_ids=mb.ids[rows, trim:], attention_mask=mb.mask[rows, trim:],
                               position_ids=mb.pos[rows, trim:], use_cache=False).last_hidden_state


class KLCache:
    """`kl_reference` per retain row, kept in host memory under the row's tokens (`kl_cache`).

    The base model is frozen while an adapter trains, so a retain row's reference hidden states
    never change; a row drawn again costs a host-to-device copy instead of a forward. A row's
    states come from the forward of the micro-batch it was first drawn in: within rounding of
    what a forward in another micro-batch would give."""

    def __init__(self):
        self.rows: dict[bytes, Tensor] = {}
        self.hits = self.misses = 0

    def reference(self, model, mb: MicroBatch) -> Tensor:
        keys = mb.retain_keys
        new = [j for j, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        if new:
            device = mb.kl_cols.device
            hb = _base_states(model, mb, mb.retain_rows[_indices(new, device)])
            # the new rows' KL positions: each row's are consecutive in kl order (collate lists
            # them row by row)
            starts = [0, *accumulate(mb.retain_counts)]
            pos = _indices([p for j in new for p in range(starts[j], starts[j + 1])], device)
            local = _indices([i for i, j in enumerate(new) for _ in range(mb.retain_counts[j])],
                             device)
            states = hb[local, mb.kl_cols[pos] - mb.retain_trim]
            pin = states.device.type == "cuda"
            for j, part in zip(new, states.split([mb.retain_counts[j] for j in new])):
                # pinned: the copy runs in stream order, and the host never reads the buffer
                buf = torch.empty(part.shape, dtype=part.dtype, pin_memory=pin)
                self.rows[keys[j]] = buf.copy_(part, non_blocking=pin)
        return torch.cat([self.rows[k].to(mb.kl_cols.device, non_blocking=True) for k in keys])


def _indices(values: list[int], device: torch.device) -> Tensor:
    """An index list on `device` without waiting for it: a list copied straight to a GPU (or
    used to index a GPU tensor) is a synchronous copy, which drains the queue of launched work."""
    pin = device.type == "cuda"
    return torch.tensor(values, dtype=torch.long, pin_memory=pin).to(device, non_blocking=pin)


def backward_terms(terms: dict[str, Tensor], weights: Mapping[str, float],
                   scale: float | None) -> dict[str, Tensor]:
    """A micro-step's terms; with `scale`, first the backward of sum(weights[k] * terms[k]) x
    scale (terms not in `weights` are only reported), and the terms come back detached."""
    if scale is None:
        return terms
    loss = sum(w * terms[k] for k, w in weights.items()) * scale
    if loss.requires_grad:
        loss.backward()
    return {k: v.detach() for k, v in terms.items()}
