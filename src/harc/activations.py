"""Residual-stream capture at t_inst, t_post and over the first N response tokens (HARC-METHOD §1).

Slot `l < n_layers` is the residual entering decoder block `l` (a forward pre-hook); slot
`n_layers` is the output of the last block, before the final norm. Hooks reduce what they see at
once (a few columns, or a masked mean), so memory holds a batch, never a whole dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from harc.chat import ChatFormat, left_pad
from harc.distributed import World
from harc.models import decoder_layers

T = TypeVar("T")


class _StopForward(Exception):
    """Raised by a hook once every requested slot is captured, to skip the remaining blocks."""


def _hidden(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class ResidualCapture:
    """Context manager recording (optionally reduced) residuals at the given slots.

    `reduce(slot, h)` maps the [batch, seq, d] residual to what is kept; with `detach=False`
    the kept tensors stay in the autograd graph (the trainer's coupling losses read them).
    With `stop_early`, the forward pass ends after the deepest requested slot.
    """

    def __init__(self, model, slots: Iterable[int], *,
                 reduce: Callable[[int, Tensor], Tensor] | None = None,
                 detach: bool = True, stop_early: bool = False):
        self.blocks = decoder_layers(model)
        self.n_layers = len(self.blocks)
        self.slots = sorted(set(slots))
        if not self.slots or self.slots[0] < 0 or self.slots[-1] > self.n_layers:
            raise ValueError(f"slots must lie in 0..{self.n_layers}, got {self.slots}")
        self.reduce = reduce
        self.detach = detach
        # FSDP2 blocks: every forward runs through all of them (see `fsdp_sharded`).
        self.stop_early = stop_early and not _fsdp_unit(self.blocks[0])
        self.out: dict[int, Tensor] = {}
        self._handles: list = []

    def _keep(self, slot: int, h: Tensor) -> None:
        if self.detach:
            h = h.detach()
        self.out[slot] = self.reduce(slot, h) if self.reduce else h
        if self.stop_early and slot == self.slots[-1]:
            raise _StopForward

    def __enter__(self) -> ResidualCapture:
        for slot in self.slots:
            if slot < self.n_layers:
                def pre(_mod, args, kwargs, slot=slot):
                    self._keep(slot, _hidden(args, kwargs))
                self._handles.append(
                    self.blocks[slot].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_mod, _args, out, slot=slot):
                    self._keep(slot, _output(out))
                self._handles.append(self.blocks[-1].register_forward_hook(post))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is _StopForward

    def run(self, model, **inputs) -> dict[int, Tensor]:
        """One forward pass under the hooks; returns the captured slots."""
        self.out = {}
        with self:
            model(**inputs, use_cache=False)
        return self.out


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _fsdp_unit(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def fsdp_sharded(model) -> bool:
    """Whether the decoder blocks are FSDP2 units. Every forward is then a collective: each rank
    must run as many as the others, through every block (no early stop: a block left between its
    unshard and its reshard breaks the next forward)."""
    return _fsdp_unit(decoder_layers(model)[0])


@torch.no_grad()
def _token_batches(encoded: Sequence[list[int]], size: int, max_tokens: int | None
                   ) -> Iterator[Sequence[list[int]]]:
    """Batches of at most `size` rows, cut early where the padded batch (rows x longest) would
    pass `max_tokens` (a row longer than that goes alone)."""
    start = 0
    while start < len(encoded):
        end, longest = start, 0
        while end < len(encoded) and end - start < size:
            longest = max(longest, len(encoded[end]))
            if max_tokens and end > start and (end - start + 1) * longest > max_tokens:
                break
            end += 1
        yield encoded[start:end]
        start = end


def iter_prompt_acts(model, chat: ChatFormat, prompts: Sequence[str], *, slots=None,
                     batch_size: int = 16, progress: Callable[[int], None] | None = None
                     ) -> Iterator[dict[str, Tensor]]:
    """Yield, per batch, {"inst": [B, S, d], "post": [B, S, d]} float32 residuals."""
    yield from iter_encoded_acts(model, chat, [chat.encode_prompt(p) for p in prompts],
                                 slots=slots, batch_size=batch_size, progress=progress)


def iter_encoded_acts(model, chat: ChatFormat, encoded: Sequence[list[int]], *, slots=None,
                      batch_size: int = 16, progress: Callable[[int], None] | None = None,
                      max_tokens: int | None = None) -> Iterator[dict[str, Tensor]]:
    """`iter_prompt_acts` over prompts already encoded (`ChatFormat.encode_prompt`), in input
    order; `max_tokens` also bounds each padded batch (rows x longest prompt)."""
    n_layers = len(decoder_layers(model))
    slots = list(range(n_layers + 1)) if slots is None else list(slots)
    cols = [chat.t_inst, chat.t_post]
    dev = _device(model)
    cap = ResidualCapture(model, slots, reduce=lambda _s, h: h[:, cols].float(), stop_early=True)
    for batch in _token_batches(encoded, batch_size, max_tokens):
        ids, mask, pos = left_pad(list(batch), chat.tokenizer.pad_token_id, dev)
        out = cap.run(model, input_ids=ids, attention_mask=mask, position_ids=pos)
        stacked = torch.stack([out[s] for s in slots], dim=1)  # [B, S, 2, d]
        yield {"inst": stacked[:, :, 0], "post": stacked[:, :, 1]}
        if progress:
            progress(len(batch))


def read_mask(chat: ChatFormat, prompt_ids: Sequence[list[int]], width: int,
              boundaries: bool = False) -> Tensor:
    """[B, width] bool over left-padded encoded prompts: the user content (first user-content
    token to t_inst), or with `boundaries` only its boundary tokens (`ChatFormat.boundaries`)."""
    mask = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
    for i, ids in enumerate(prompt_ids):
        o = width - len(ids)
        if boundaries:
            mask[i, [o + b for b in chat.boundaries(ids)]] = True
        else:
            mask[i, o + chat.head_len: o + len(ids) - chat.tail_len] = True
    return mask


@torch.no_grad()
def iter_read_acts(model, chat: ChatFormat, prompts: Sequence[str], v: Tensor, *,
                   slots: Sequence[int], mode: str = "max", boundaries: bool = False,
                   temp: float = 0.1, batch_size: int = 16) -> Iterator[Tensor]:
    """Yield, per batch, [B, S, d] float32: each slot's residual where its harmfulness is read.

    v [S, d] are unit directions at `slots`. Over the positions of `read_mask`: "max" takes the
    residual at the largest cos(h_t, v); "softmax" the softmax(cos / temp)-weighted mean of the
    residuals (the reading `harc.losses.read_projection` couples).
    """
    slots = list(slots)
    dev = _device(model)
    vs = {s: v[j].to(dev, torch.float32) for j, s in enumerate(slots)}
    for batch in _batches(prompts, batch_size):
        encs = [chat.encode_prompt(p) for p in batch]
        ids, mask, pos = left_pad(encs, chat.tokenizer.pad_token_id, dev)
        read = read_mask(chat, encs, ids.shape[1], boundaries).to(dev)

        def pick(slot: int, h: Tensor, read: Tensor = read) -> Tensor:
            h = h.float()
            p = torch.nn.functional.cosine_similarity(h, vs[slot], dim=-1).masked_fill(
                ~read, float("-inf"))
            w = (torch.softmax(p / temp, dim=-1) if mode == "softmax"
                 else torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float())
            return torch.einsum("btd,bt->bd", h, w)

        out = ResidualCapture(model, slots, reduce=pick, stop_early=True).run(
            model, input_ids=ids, attention_mask=mask, position_ids=pos)
        yield torch.stack([out[s] for s in slots], dim=1)


@torch.no_grad()
def iter_response_acts(model, chat: ChatFormat, pairs: Sequence[tuple[str, str]], *,
                       n_tokens: int = 32, slots=None, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> Iterator[Tensor]:
    """Yield, per batch, [B, S, d] float32: the residual mean-pooled over the first `n_tokens`
    response tokens of each teacher-forced (prompt, response) pair (fewer if shorter)."""
    n_layers = len(decoder_layers(model))
    slots = list(range(n_layers + 1)) if slots is None else list(slots)
    dev = _device(model)
    for batch in _batches(pairs, batch_size):
        encs = [chat.encode_pair(p, r, add_eos=False) for p, r in batch]
        ids, mask, pos = left_pad([e.ids for e in encs], chat.tokenizer.pad_token_id, dev)
        window = response_window(encs, ids.shape[1], n_tokens, dev)
        cap = ResidualCapture(model, slots, reduce=lambda _s, h, w=window: masked_mean(h, w),
                              stop_early=True)
        out = cap.run(model, input_ids=ids, attention_mask=mask, position_ids=pos)
        yield torch.stack([out[s] for s in slots], dim=1)
        if progress:
            progress(len(batch))


def response_window(encs, width: int, n_tokens: int, device=None) -> Tensor:
    """[B, width] float mask of the first `n_tokens` response tokens in a left-padded batch."""
    w = torch.zeros(len(encs), width)
    for i, e in enumerate(encs):
        start = width - len(e.ids) + e.resp_start
        w[i, start: start + min(n_tokens, e.resp_len)] = 1.0
    return w.to(device) if device is not None else w


def masked_mean(h: Tensor, window: Tensor) -> Tensor:
    """Mean of h [B, T, d] over the positions where window [B, T] is 1, in float32."""
    w = window.to(h.device, torch.float32)
    return torch.einsum("btd,bt->bd", h.float(), w) / w.sum(1, keepdim=True).clamp(min=1.0)


class MeanAccumulator:
    """Running means of per-example activations, with an online Poisson bootstrap.

    Memory is independent of the number of examples: each example gets a Poisson(1) weight per
    resample (the Poisson bootstrap approximates multinomial resampling for large n), and only the
    K weighted sums are kept. The same weights apply to every named view of one example (its
    t_inst and t_post vectors come from the same resampled prompt).
    """

    def __init__(self, n_boot: int = 0, seed: int = 0):
        self.n_boot = n_boot
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0
        self.sums: dict[str, Tensor] = {}
        self.boot_sums: dict[str, Tensor] = {}
        self.boot_counts = torch.zeros(n_boot, dtype=torch.float64)

    def _weights(self, b: int) -> Tensor:
        return torch.poisson(torch.ones(self.n_boot, b, dtype=torch.float64), generator=self.gen)

    def skip(self, b: int) -> None:
        """Draw and drop the bootstrap weights of `b` examples that another rank accumulates, so
        that every later example gets the weights a single process gives it."""
        if self.n_boot:
            self._weights(b)

    def add(self, views: dict[str, Tensor]) -> None:
        b = next(iter(views.values())).shape[0]
        w = None
        if self.n_boot:
            w = self._weights(b)
            self.boot_counts += w.sum(1)
        for name, x in views.items():
            x = x.detach().to("cpu", torch.float64)
            self.sums[name] = self.sums.get(name, 0) + x.sum(0)
            if w is not None:
                self.boot_sums[name] = self.boot_sums.get(name, 0) + torch.einsum("kb,b...->k...", w, x)
        self.count += b

    def mean(self, name: str) -> Tensor:
        if not self.count:
            raise ValueError("no examples were accumulated")
        return (self.sums[name] / self.count).float()

    def boot_means(self, name: str) -> Tensor:
        """[K, ...] resampled means."""
        shape = (-1,) + (1,) * (self.boot_sums[name].dim() - 1)
        return (self.boot_sums[name] / self.boot_counts.clamp(min=1).view(shape)).float()


def rank_share(world: World, items: Sequence[T], batch_size: int, even: bool = False
               ) -> tuple[list[T], int]:
    """This rank's whole batches of `items` (`World.shard`) and how many items were appended to
    them: with `even`, a rank that has a batch fewer than others runs one more, a copy of the
    first batch, to be dropped (under FSDP2 every forward is a collective). Only ranks without
    the last, possibly short, batch are short of one, so their share is whole batches."""
    mine = world.shard(items, batch_size)
    n = -(-len(items) // batch_size)
    pad = items[:batch_size] if even and -(-len(mine) // batch_size) < -(-n // world.size) else []
    return mine + list(pad), len(pad)


def accumulate_sharded(world: World, acts: Callable[[Sequence], Iterable[dict[str, Tensor]]],
                       items: Sequence, acc: MeanAccumulator, batch_size: int,
                       even: bool = False) -> MeanAccumulator:
    """`acc` fed with every batch of `acts(items)`, each rank running its share, then summed over
    ranks. The bootstrap stream advances past other ranks' batches (`skip`), so every example gets
    the Poisson weights of a single process and the result does not depend on the rank count.
    `even`: every rank runs as many batches (`rank_share`)."""
    share, padded = rank_share(world, items, batch_size, even)
    mine: Iterator[dict[str, Tensor]] = iter(acts(share))
    for j in range(-(-len(items) // batch_size)):
        if j % world.size == world.rank:
            acc.add(next(mine))
        else:
            acc.skip(len(items[j * batch_size: (j + 1) * batch_size]))
    if padded:
        next(mine)
    return reduce_accumulator(world, acc)


def reduce_accumulator(world: World, acc: MeanAccumulator) -> MeanAccumulator:
    """Sum the accumulators of all ranks in place (float64); a rank that saw no batch contributes
    zeros of the shapes the others report."""
    shapes: dict[str, tuple] = {}
    for seen in world.all_gather_object({f"{kind}/{name}": tuple(t.shape)
                                         for kind, d in (("s", acc.sums), ("b", acc.boot_sums))
                                         for name, t in d.items()}):
        shapes.update(seen)
    parts = {k: (acc.sums if k[0] == "s" else acc.boot_sums).get(k[2:], None) for k in shapes}
    parts = {k: v if v is not None else torch.zeros(shapes[k], dtype=torch.float64)
             for k, v in parts.items()}
    parts["boot_counts"] = acc.boot_counts
    parts["count"] = torch.tensor([float(acc.count)], dtype=torch.float64)
    total = world.all_reduce_sum(parts)
    acc.sums = {k[2:]: v for k, v in total.items() if k.startswith("s/")}
    acc.boot_sums = {k[2:]: v for k, v in total.items() if k.startswith("b/")}
    acc.boot_counts, acc.count = total["boot_counts"], int(total["count"].item())
    return acc
