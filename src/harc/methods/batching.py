"""Training rows: encoding, the seeded length-aware sampler and the left-padded micro-batch with
every index the losses need (built once, on the CPU).

Length-aware batching: each category's draw for a window of micro-batches is sorted by length and
dealt out in order, so each micro-batch keeps its 6/4/2 composition with less padding. The data
order is a pure function of (seed, micro-step), so resuming needs no sampler state.

A harmful example may carry a second, *rejected* row (preference methods: the refusal is preferred
over the harmful completion). Such rows are appended after the sampled rows, as kind `REJECTED`,
with their own target positions (`rej_*`) and their pairing; a micro-batch without them is exactly
what it was before the kind existed.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.chat import ChatFormat, PairEncoding, left_pad
from harc.methods.config import KINDS, TrainConfig

REJECTED = len(KINDS)  # row kind of a rejected response, paired with a harmful row


@dataclass(frozen=True)
class Example:
    """One encoded training row: `window` = response tokens pooled by the response coupling;
    `pool` = target tokens a pooled window may cover (0: `window`); `rejected` = the dispreferred
    response to the same prompt (preference methods only)."""

    enc: PairEncoding
    kind: int  # index into KINDS, or REJECTED
    window: int
    pool: int = 0
    rejected: Example | None = None

    @property
    def length(self) -> int:
        return len(self.enc.ids)


def encode_example(chat: ChatFormat, rec: Mapping, kind: int, n_resp_tokens: int = 32,
                   target: str | None = None, boundaries: bool = False) -> Example:
    """A record as a teacher-forced row; `target` names the response field (default: the refusal
    for harmful rows, the response for retain rows). A record's "prefill" text goes before the
    target and is no target itself; `boundaries` also locates the prompt's boundary tokens."""
    target = target or ("refusal" if kind == 0 else "response")
    enc = chat.encode_pair(rec["prompt"], rec[target], add_eos=True, prefill=rec.get("prefill"),
                           boundaries=boundaries)
    has_eos = chat.tokenizer.eos_token_id is not None
    # The pooled window matches extraction, which encodes responses without the EOS.
    pool = max(enc.resp_len - enc.prefill_len - int(has_eos), 1)
    return Example(enc, kind, min(n_resp_tokens, pool), pool)


@dataclass
class MicroBatch:
    """A left-padded micro-batch with every index the losses need, built once on the CPU."""

    ids: Tensor
    mask: Tensor
    pos: Tensor
    is_harmful: Tensor  # [B] bool
    kind: Tensor  # [B] int
    inst_col: Tensor  # [B] column of t_inst
    post_col: Tensor  # [B] column of t_post
    window: Tensor  # [B, T] 1 on the pooled response tokens
    ce_rows: Tensor  # positions that predict harmful response tokens
    ce_cols: Tensor
    ce_targets: Tensor
    kl_rows: Tensor  # positions that predict retain response tokens
    kl_cols: Tensor
    retain_rows: Tensor  # rows of the base (KL reference) forward
    retain_trim: int  # leading columns that are padding in every retain row
    kl_sub_rows: Tensor  # kl_rows as indices into retain_rows
    n_real: int
    n_padded: int
    rej_rows: Tensor  # positions that predict rejected response tokens (empty without pairs)
    rej_cols: Tensor
    rej_targets: Tensor
    pairs: Tensor  # [P, 2] (chosen row, rejected row)
    user_col: Tensor | None = None  # [B] column of the first user-content token
    resp_col: Tensor | None = None  # [B] column of the first target token (after any prefill)
    resp_pool: Tensor | None = None  # [B] target tokens a pooled window may cover
    boundary: Tensor | None = None  # [B, T] bool: boundary tokens (when the rows carry them)
    retain_keys: tuple[bytes, ...] = ()  # each retain row's tokens (the KL cache's key)
    retain_counts: tuple[int, ...] = ()  # each retain row's KL positions

    def to(self, device) -> MicroBatch:
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                 for f in dataclasses.fields(self)}
        return MicroBatch(**moved)


def collate(examples: Sequence[Example], tail_len: int, pad_id: int,
            multiple: int = 1) -> MicroBatch:
    """Left-pad `examples` (to a width that is a multiple of `multiple`) and index them; the
    rejected rows of examples that carry one are appended after them."""
    pairs = [(i, len(examples) + j) for j, i in
             enumerate(i for i, e in enumerate(examples) if e.rejected is not None)]
    examples = list(examples) + [examples[i].rejected for i, _ in pairs]
    ids, mask, pos = left_pad([e.enc.ids for e in examples], pad_id)
    extra = -ids.shape[1] % multiple
    if extra:  # fewer distinct shapes: GEMM heuristics and allocator blocks get reused
        ids = F.pad(ids, (extra, 0), value=pad_id)
        mask, pos = F.pad(mask, (extra, 0)), F.pad(pos, (extra, 0))
    B, T = ids.shape
    kind = torch.tensor([e.kind for e in examples], dtype=torch.long)
    offs = [T - e.length for e in examples]
    post = torch.tensor([o + e.enc.resp_start - 1 for o, e in zip(offs, examples, strict=True)])
    inst = torch.stack([(post - tail_len).clamp(min=0), torch.tensor(offs)]).max(0).values
    window = torch.zeros(B, T)
    boundary = (torch.zeros(B, T, dtype=torch.bool) if any(e.enc.boundaries for e in examples)
                else None)
    ce, kl, rej = ([], [], []), ([], []), ([], [], [])
    for i, (o, e) in enumerate(zip(offs, examples, strict=True)):
        start = o + e.enc.resp_start + e.enc.prefill_len  # the prefill is context, not target
        window[i, start: start + e.window] = 1.0
        if boundary is not None:
            boundary[i, [o + b for b in e.enc.boundaries]] = True
        cols = list(range(start - 1, o + e.enc.resp_start + e.enc.resp_len - 1))
        if e.kind in (0, REJECTED):
            dest = ce if e.kind == 0 else rej
            dest[0].extend([i] * len(cols))
            dest[1].extend(cols)
            dest[2].extend(e.enc.ids[e.enc.resp_start + e.enc.prefill_len:])
        else:
            kl[0].extend([i] * len(cols))
            kl[1].extend(cols)
    retain = ((kind != 0) & (kind != REJECTED)).nonzero().squeeze(1)
    trim = min((offs[i] for i in retain.tolist()), default=0) // multiple * multiple
    sub = {r: j for j, r in enumerate(retain.tolist())}
    keys = tuple(array("l", examples[r].enc.ids).tobytes() for r in sub)
    counts = tuple(kl[0].count(r) for r in sub)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return MicroBatch(
        ids=ids, mask=mask, pos=pos, is_harmful=kind == 0, kind=kind, inst_col=inst,
        post_col=post, window=window, ce_rows=t(ce[0]), ce_cols=t(ce[1]), ce_targets=t(ce[2]),
        kl_rows=t(kl[0]), kl_cols=t(kl[1]), retain_rows=retain, retain_trim=trim,
        kl_sub_rows=t([sub[r] for r in kl[0]]), n_real=int(mask.sum()), n_padded=B * T,
        rej_rows=t(rej[0]), rej_cols=t(rej[1]), rej_targets=t(rej[2]),
        pairs=t(pairs).view(-1, 2),
        user_col=t([o + e.enc.user_start for o, e in zip(offs, examples, strict=True)]),
        resp_col=t([o + e.enc.resp_start + e.enc.prefill_len
                    for o, e in zip(offs, examples, strict=True)]),
        resp_pool=t([e.pool or e.window for e in examples]), boundary=boundary,
        retain_keys=keys, retain_counts=counts)


class MicroBatchSampler:
    """Rows of global micro-batch `index` as a pure function of (seed, index).

    Each category is read in seeded epoch permutations; the draws of one window of micro-batches
    are sorted by length per category and dealt out in order (less padding, same composition).
    """

    def __init__(self, cfg: TrainConfig, examples: Mapping[str, Sequence[Example]]):
        self.cfg, self.examples = cfg, examples
        self._perms: dict[tuple[int, int], list[int]] = {}
        self._window: tuple[int, list[list[tuple[int, int]]]] | None = None

    def _perm(self, kind: int, epoch: int) -> list[int]:
        key = (kind, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + kind * 7_919 + epoch)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != kind or k[1] >= epoch - 1}
            self._perms[key] = torch.randperm(len(self.examples[KINDS[kind]]), generator=g).tolist()
        return self._perms[key]

    def __call__(self, index: int) -> list[Example]:
        c = self.cfg
        width = c.bucket_window or c.grad_accum
        w, g = divmod(index, width)
        if self._window is None or self._window[0] != w:
            groups: list[list[tuple[int, int]]] = [[] for _ in range(width)]
            for ki, kind in enumerate(KINDS):
                n, exs = getattr(c.batch, kind), self.examples[kind]
                if not n:
                    continue
                start = w * width * n
                draw = []
                for p in range(start, start + width * n):
                    epoch, i = divmod(p, len(exs))
                    draw.append(self._perm(ki, epoch)[i])
                draw.sort(key=lambda i, exs=exs: exs[i].length)
                for j in range(width):
                    groups[j].extend((ki, i) for i in draw[j * n:(j + 1) * n])
            self._window = (w, groups)
        return [self.examples[KINDS[k]][i] for k, i in self._window[1][g]]
