"""Generation under a runtime monitor.

A monitor has `slot` (int), `replacement` (str) and `__call__(h, rows) -> Tensor[B] bool`: at
every decode step it sees the residual entering decoder block `slot` (the last block's output for
slot == n_layers) at each live row's newest generated token, `h` [B, d], with `rows` the indices
of those rows' prompts in the call, and returns the rows to stop; a stopped row's text becomes
`replacement`. This is the `monitor=` API of harc's generation engine. Where `generate` does not
take one yet, an eager fallback runs the reference generator with forward hooks: the same
decisions on the same tokens, only stopped rows keep decoding until their batch ends.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import torch

from harc.errors import HarcError
from harc.generation import generate
from harc.models import decoder_layers


def generate_monitored(model, chat, prompts: Sequence[str], *, monitor,
                       prefills: Sequence[str | None] | None = None, steer=None,
                       max_new_tokens: int = 128, batch_size: int = 16) -> list[str]:
    """`generate` with a runtime monitor (the engine's own where it has one)."""
    kw = dict(steer=steer, max_new_tokens=max_new_tokens)
    if "monitor" in inspect.signature(generate).parameters:
        return generate(model, chat, list(prompts), prefills=prefills, batch_size=batch_size,
                        monitor=monitor, **kw)
    prefills = list(prefills) if prefills is not None else [None] * len(prompts)
    encoded = [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
               for p, f in zip(prompts, prefills)]
    # One generate call per batch, already in length order: `generate` keeps a sorted batch as
    # it is, so batch row r is prompt idx[r] (checked on the prompt pass).
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        watch = _Watch(model, chat, monitor, idx, [encoded[i] for i in idx])
        with watch:
            texts = generate(model, chat, [prompts[i] for i in idx],
                             prefills=[prefills[i] for i in idx], batch_size=len(idx), **kw)
        for r, i in enumerate(idx):
            out[i] = monitor.replacement if watch.stopped[r] else texts[r]
    return out


class _Watch(contextlib.AbstractContextManager):
    """Hooks of one batch: the embedding's pre-hook sees which token each row feeds (a row that
    has fed an EOS or padding has ended); the hook at the monitor's slot asks the monitor about
    the live rows at each decode step."""

    def __init__(self, model, chat, monitor, idx: list[int], encoded: list[list[int]]):
        self.model, self.monitor, self.idx, self.encoded = model, monitor, idx, encoded
        tok = chat.tokenizer
        eos = (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None))
        self.ends = sorted({e for t in eos if t is not None
                            for e in (t if isinstance(t, list) else [t])} | {tok.pad_token_id})
        self.ended = torch.zeros(len(idx), dtype=torch.bool)
        self.stopped = [False] * len(idx)
        self.decoding = False
        self._handles: list = []

    def _embed(self, _mod, args):
        ids = args[0]
        if ids.shape[1] > 1:  # the prompt pass
            self.decoding = False
            for r, want in enumerate(self.encoded):
                if ids[r, -len(want):].tolist() != want:
                    raise HarcError("the runtime monitor could not match generation rows to "
                                    "prompts; pass monitor= to a generate that supports it")
            return
        self.decoding = True
        self.ended |= torch.isin(ids[:, 0].cpu(), torch.tensor(self.ends))

    def _see(self, h):
        if not self.decoding:
            return
        live = [r for r in range(len(self.idx)) if not self.ended[r] and not self.stopped[r]]
        if not live:
            return
        flags = self.monitor(h[live, -1], [self.idx[r] for r in live])
        for r, f in zip(live, torch.as_tensor(flags).tolist()):
            self.stopped[r] = self.stopped[r] or bool(f)

    def __enter__(self):
        blocks = decoder_layers(self.model)
        slot = self.monitor.slot
        if not 0 <= slot <= len(blocks):
            raise HarcError(f"monitor slot {slot} is outside 0..{len(blocks)}")
        self._handles.append(self.model.get_input_embeddings().register_forward_pre_hook(
            self._embed))
        if slot < len(blocks):
            self._handles.append(blocks[slot].register_forward_pre_hook(
                lambda _m, args, kwargs: self._see(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            self._handles.append(blocks[-1].register_forward_hook(
                lambda _m, _a, out: self._see(out[0] if isinstance(out, tuple) else out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
