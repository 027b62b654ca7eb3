"""The greedy decoder behind `harc.generation.generate`: static slot cache, continuous batching,
shared-prefix reuse and CUDA-graph decode steps.

Layout: each layer's KV cache is one [slots, kv_heads, length, head_dim] tensor and the token at
position p of the row in slot s lives in column p. Rows of any length therefore share one decode
step (per-row positions, write columns and masks), and a finished row's slot takes the next prompt
without touching the others. The model runs unmodified through transformers' `Cache` and
attention-function interfaces; steering and monitor hooks see the usual residual stream.

Host and device meet once per window of decode steps: the host reads which rows finished, refills
or compacts the slots and launches the next window, then decodes finished texts while it runs. On
CUDA each bucket's step is captured once as a CUDA graph and replayed; its inputs are the
persistent state tensors, updated in place. A bucket is a row count, and also a cache width when
SDPA reads the cache (Triton's attention reads each row's own columns, so it takes them all).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from harc import _decode_attn, _decode_norm, _decode_proj, _decode_rope
from harc._decode_prefix import prefix_groups
from harc.models import decoder_layers, unwrap

ATTN = "harc_slots"
_attn_calls = [0]  # attention calls since the last reset: proves every layer went through us
_decode_path = [None]  # "triton" or "sdpa": what the last one-token attention call ran


class Unsupported(Exception):
    """The model does not run through the slot cache; callers fall back to `model.generate`."""


def _attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor,
               scaling: float | None = None, dropout: float = 0.0, **kwargs):
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise Unsupported("attention with logit soft-capping or sinks")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise Unsupported(f"sliding-window attention over more than {window} tokens")
    _attn_calls[0] += 1
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    # Engine._mask attaches each row's valid length to decode masks when the Triton kernel is on.
    lens = getattr(attention_mask, "harc_lens", None) if t == 1 else None
    attention_mask = attention_mask.to(query.dtype)  # e.g. float32 hidden states in a bf16 model
    if t == 1:
        out = None if lens is None else _decode_attn.attend(query, key, value, lens, scaling)
        _decode_path[0] = "sdpa" if out is None else "triton"
        if out is not None:
            return out, None
        # Decode: the query heads of one KV group become queries of one head, so a fused kernel reads
        # each K/V column once (repeat_kv would copy the whole cache hq/hkv times every step).
        q = query.reshape(b, hkv, hq // hkv, d)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, 1, hq, d), None
    if hq != hkv:
        key, value = key.repeat_interleave(hq // hkv, 1), value.repeat_interleave(hq // hkv, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None


ALL_ATTENTION_FUNCTIONS.register(ATTN, _attention)


class SlotCache(Cache):
    """Per-layer [slots, kv_heads, length, head_dim] keys and values, allocated at the first write.

    Before each forward the engine sets `rows` (slot of each input row; None means slots [:batch]
    in order, the decode case), `cols` ([batch, T] column each input token writes) and `width`
    (columns attention reads)."""

    def __init__(self, n_layers: int, slots: int, length: int, fused_store: bool = False):
        super().__init__(layers=[DynamicLayer() for _ in range(n_layers)])
        self.slots, self.length = slots, length
        self.k: list[Tensor | None] = [None] * n_layers
        self.v: list[Tensor | None] = [None] * n_layers
        self.rows: Tensor | None = None
        self.cols: Tensor | None = None
        self.width = 0
        self.updates = 0
        self.fused_store = fused_store  # decode steps write through `_decode_attn.store_kv`

    def alloc(self, layer_idx: int, like: Tensor) -> None:
        if self.k[layer_idx] is None:
            shape = (self.slots, like.shape[-3], self.length, like.shape[-1])
            self.k[layer_idx], self.v[layer_idx] = like.new_zeros(shape), like.new_zeros(shape)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self.alloc(layer_idx, key_states)
        k, v = self.k[layer_idx], self.v[layer_idx]
        self.updates += 1
        if self.rows is None:
            b = key_states.shape[0]
            if not (self.fused_store and _decode_attn.store_kv(k, v, key_states, value_states, self.cols)):
                idx = self.cols.view(b, 1, -1, 1).expand(-1, k.shape[1], -1, k.shape[3])
                k[:b].scatter_(2, idx, key_states)
                v[:b].scatter_(2, idx, value_states)
            return k[:b, :, :self.width], v[:b, :, :self.width]
        r = self.rows[:, None]
        k[r, :, self.cols], v[r, :, self.cols] = key_states.transpose(1, 2), value_states.transpose(1, 2)
        return k[self.rows, :, :self.width], v[self.rows, :, :self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly


class CudaGraphs:
    """One CUDA graph per decode-step bucket, sharing a memory pool (replays never overlap).

    The first step of a new bucket runs eagerly on a side stream, as the warm-up before a capture
    (it is a real step), and is then captured; later steps of that bucket replay it."""

    def __init__(self):
        self.graphs: dict = {}
        self.pool = None
        self.side = torch.cuda.Stream()  # one stream: the allocator caches blocks per stream
        self.seconds = 0.0  # spent capturing (warm-up steps excluded)
        # eager warm-up steps: real steps, but slow ones, which a benchmark of replays leaves out
        self.warmup_seconds, self.warmup_steps = 0.0, 0

    def eager(self, fn: Callable[[], None], stream=None) -> None:
        """A step run without a graph, counted with the warm-ups."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if stream is None:
            fn()
        else:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.warmup_steps += 1
        self.warmup_seconds += time.perf_counter() - t0

    def run(self, key, fn: Callable[[], None]) -> None:
        g = self.graphs.get(key)
        if g is not None:
            g.replay()
            return
        self.eager(fn, self.side)
        t0 = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        self.pool = g.pool()
        self.graphs[key] = g
        self.seconds += time.perf_counter() - t0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def width_bucket(n: int, cap: int) -> int:
    """Columns attention reads for sequences up to n: at most 25% over, so few buckets exist."""
    return min(cap, _round_up(n, max(64, 1 << max(0, n.bit_length() - 3))))


class Engine:
    """Greedy decoding of token sequences with up to `slots` rows in flight.

    `run(seqs, finish)` calls `finish(rows, tokens, stopped)` as rows complete: indices into `seqs`,
    the generated tokens (ending with the EOS id when one was produced) and whether the monitor
    stopped each row.
    """

    def __init__(self, model, *, max_new_tokens: int, slots: int, eos_ids: list[int],
                 graphs: bool = False, monitor=None, prefix_reuse: bool = True,
                 window: int | None = None, prefill_tokens: int | None = None,
                 min_rows: int | None = None):
        self.model = model
        base = unwrap(model)
        params = inspect.signature(base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in 5.2x
        self.blocks = decoder_layers(model)
        emb = base.get_input_embeddings().weight
        self.dev, self.dtype = emb.device, emb.dtype
        cuda = self.dev.type == "cuda"
        self.max_new, self.slots = max_new_tokens, slots
        self.graphs = CudaGraphs() if graphs else None
        self.monitor, self.prefix_reuse = monitor, prefix_reuse
        # The host looks for finished rows once per window: every step where that costs nothing
        # (CPU) or a monitor needs it, else every 8 steps so the GPU queue never drains.
        self.window = window or (1 if monitor is not None or not cuda else 8)
        self.prefill_tokens = prefill_tokens or (32768 if cuda else 4096)
        # Buckets below 16 rows would mostly add graph captures: the weights' read dominates there.
        self.min_rows = min_rows or (16 if graphs else 1)
        self.eos = torch.tensor(eos_ids or [-1], device=self.dev)
        self.triton_attn = _decode_attn.enabled(self.dev)
        self.triton_norm = _decode_norm.enabled(self.dev)
        self.triton_rope = _decode_rope.enabled(self.dev)
        self.merge_proj = _decode_proj.enabled(self.dev)
        self.fuse_residual = _decode_norm.residual_enabled(self.dev)
        self.stats = {"steps": 0, "fills": 0, "compactions": 0, "prefill_tokens": 0,
                      "prefix_tokens": 0, "forwards": 0, "graphs": 0, "eager_fallback": None,
                      "decode_attn": None, "fused_norms": 0, "fused_rotary": 0,
                      "merged_projections": 0, "fused_residuals": 0}
        self._decoding = False
        self._h: Tensor | None = None

    # model calls ---------------------------------------------------------------------------------
    def _forward(self, cache: SlotCache, ids: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        check = self.stats["forwards"] == 0
        if check:
            _attn_calls[0], cache.updates = 0, 0
        try:
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True,
                             logits_to_keep=1, **{self.cache_arg: cache})
        except TypeError as e:  # a forward without position ids, 4D masks or logits_to_keep
            raise Unsupported(str(e).splitlines()[0]) from e
        self.stats["forwards"] += 1
        if check and (cache.updates != len(self.blocks) or _attn_calls[0] != len(self.blocks)):
            raise Unsupported("its layers do not all use the cache and attention interfaces")
        return out.logits[:, -1]

    def _mask(self, qpos: Tensor, width: int) -> Tensor:
        """Additive [B, 1, T, width] mask, built once per forward for every layer: the query at
        position p sees columns <= p."""
        visible = self.cols_ar[:width] <= qpos[..., None]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.dev)
        mask = mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None]
        if self.triton_attn and qpos.shape[-1] == 1:
            mask.harc_lens = qpos[:, 0] + 1  # the columns each row's query sees: [0, pos]
        return mask

    def _prefill_forward(self, cache: SlotCache, slots: Tensor, seqs: list[list[int]],
                         starts: list[int]) -> Tensor:
        """Left-padded forward of `seqs` (row i continuing at position starts[i]) into `slots`;
        returns the last position's logits. Padding queries see column 0 and write the last column,
        which no prompt reaches."""
        t = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), t), dtype=torch.long)
        pos = torch.zeros((len(seqs), t), dtype=torch.long)
        cols = torch.full((len(seqs), t), cache.length - 1, dtype=torch.long)
        for i, (s, p0) in enumerate(zip(seqs, starts)):
            ids[i, t - len(s):] = torch.tensor(s)
            pos[i, t - len(s):] = cols[i, t - len(s):] = torch.arange(p0, p0 + len(s))
        width = min(cache.length, _round_up(max(p0 + len(s) for s, p0 in zip(seqs, starts)), 64))
        ids, pos, cols = ids.to(self.dev), pos.to(self.dev), cols.to(self.dev)
        cache.rows, cache.cols, cache.width = slots, cols, width
        self.stats["prefill_tokens"] += sum(len(s) for s in seqs)
        return self._forward(cache, ids, pos, self._mask(pos, width))

    def _prefix_kv(self, tokens: list[int]) -> list[tuple[Tensor, Tensor]]:
        cache = SlotCache(len(self.blocks), 1, _round_up(len(tokens) + 1, 64))
        self._prefill_forward(cache, torch.zeros(1, dtype=torch.long, device=self.dev), [tokens], [0])
        self.stats["prefix_tokens"] += len(tokens)
        return [(k[0, :, :len(tokens)], v[0, :, :len(tokens)]) for k, v in zip(cache.k, cache.v)]

    # decode step (graph-safe: reads and writes only persistent tensors) ---------------------------
    def _step(self, b: int, width: int) -> None:
        st = self.st
        pos = st["pos"][:b]
        self.cache.rows, self.cache.cols, self.cache.width = None, pos[:, None], width
        nxt = self._forward(self.cache, st["tok"][:b, None], pos[:, None],
                            self._mask(pos[:, None], width)).argmax(-1)
        live = ~st["done"][:b]
        st["out"][:b].scatter_(1, st["ngen"][:b, None], nxt[:, None])
        st["ngen"][:b] += live
        st["pos"][:b] += live  # finished rows stay put: their columns never pass the cache end
        st["tok"][:b] = nxt
        st["done"][:b] |= live & ((nxt[:, None] == self.eos).any(-1) | (st["ngen"][:b] >= self.max_new))

    def _run_step(self, b: int, width: int) -> None:
        self.stats["steps"] += 1
        if self.graphs is None:
            self._step(b, width)
            self.stats["decode_attn"] = _decode_path[0]
            return
        if self.stats["decode_attn"] is None:  # eagerly: shows which attention graphs would hold
            self.graphs.eager(partial(self._step, b, width))
            self.stats["decode_attn"] = _decode_path[0]
            return
        try:
            self.graphs.run((b, width), partial(self._step, b, width))
            g = self.graphs
            self.stats.update(graphs=len(g.graphs), capture_s=g.seconds,
                              warmup_s=g.warmup_seconds, warmup_steps=g.warmup_steps)
            self.stats["decode_attn"] = _decode_path[0]  # as captured (replays run no Python)
        except Unsupported:
            raise
        except Exception as e:  # a failed capture costs speed, never results: its step already ran
            torch.cuda.synchronize()
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"CUDA graph capture failed ({msg}); decoding eagerly", stacklevel=2)
            self.stats["eager_fallback"] = msg[:300]
            self.graphs = None

    # the loop ------------------------------------------------------------------------------------
    def run(self, seqs: list[list[int]],
            finish: Callable[[list[int], list[list[int]], list[bool]], None]) -> None:
        n = len(seqs)
        if n == 0:
            return
        lens = [len(s) for s in seqs]
        length = _round_up(max(lens) + self.max_new + 1, 64)
        S = min(self.slots, n)
        self.cache = SlotCache(len(self.blocks), S, length, _decode_attn.store_enabled(self.dev))
        self.cols_ar = torch.arange(length, device=self.dev)
        lng = dict(dtype=torch.long, device=self.dev)
        self.st = {"tok": torch.zeros(S, **lng), "pos": torch.zeros(S, **lng),
                   "ngen": torch.zeros(S, **lng), "out": torch.zeros((S, self.max_new + 1), **lng),
                   "done": torch.ones(S, dtype=torch.bool, device=self.dev)}
        self.group, self.plen, self.ptoks = (prefix_groups(seqs) if self.prefix_reuse
                                             else ([-1] * n, [0] * n, []))
        self.prefixes: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.row_of = [-1] * S  # prompt in each slot, -1 when free
        self.ngen = [0] * S  # generated tokens per slot as of the last look
        pending = deque(sorted(range(n), key=lambda i: lens[i]))
        stopped: set[int] = set()
        refill_at = max(1, S // 8)
        with ExitStack() as undo:
            if self.monitor is not None:
                undo.callback(self._monitor_hook().remove)
            for key, on, fuse in (  # residual adds first: the layers' norms are still plain
                    ("fused_residuals", self.fuse_residual,
                     lambda: _decode_norm.fused_residuals(self.blocks)),
                    ("fused_norms", self.triton_norm, lambda: _decode_norm.fused_norms(self.model)),
                    ("fused_rotary", self.triton_rope, lambda: _decode_rope.fused_rotary(self.model)),
                    ("merged_projections", self.merge_proj,
                     lambda: _decode_proj.merged_projections(self.model))):
                if on:
                    self.stats[key] = undo.enter_context(fuse())
            b, snap, row_of = S, None, self.row_of
            while True:
                rows, toks = [], []
                if snap is not None:  # harvest
                    head = snap[:, :2].tolist()
                    for s in range(b):
                        if row_of[s] >= 0:
                            self.ngen[s] = head[s][1]
                            if head[s][0]:
                                rows.append(row_of[s])
                                toks.append(snap[s, 2: 2 + self.ngen[s]].tolist())
                                row_of[s] = -1
                live = [s for s in range(b) if row_of[s] >= 0]
                if not pending and b // 2 >= max(len(live), self.min_rows):
                    b = self._compact(live, b, lens)
                    live = list(range(len(live)))
                free = [s for s in range(b) if row_of[s] < 0]
                if pending and free and (len(free) >= min(refill_at, len(pending)) or not live):
                    self._fill([pending.popleft() for _ in range(min(len(free), len(pending)))],
                               free, seqs)
                    live = [s for s in range(b) if row_of[s] >= 0]
                if live and self.max_new > 1:
                    top = max(lens[row_of[s]] + self.ngen[s] for s in live)
                    bucket = width_bucket(top + self.window, length)
                    for _ in range(self.window):
                        self._monitored_step(b, self._width(b, bucket, length), stopped)
                if rows:  # texts and callbacks overlap the window just launched
                    finish(rows, toks, [r in stopped for r in rows])
                if not live and not pending:
                    break
                snap = torch.cat([self.st["done"][:b, None].long(), self.st["ngen"][:b, None],
                                  self.st["out"][:b]], 1).cpu()

    def _width(self, b: int, bucket: int, length: int) -> int:
        """Columns a decode step reads: all under Triton's attention, which reads each row's own
        (so one graph serves a row bucket), unless that changes the kernel's split count and with
        it the rounding; else the bucket."""
        if self.stats["decode_attn"] != "triton":
            return bucket
        splits = partial(_decode_attn.default_splits, b, self.cache.k[0].shape[1], device=self.dev)
        return length if splits(width=length) == splits(width=bucket) else bucket

    def _fill(self, take: list[int], free: list[int], seqs: list[list[int]]) -> None:
        """Prefill the prompts `take` into free slots (after their shared prefixes), in chunks of
        about `prefill_tokens` padded tokens."""
        self.stats["fills"] += 1
        take = sorted(take, key=lambda i: len(seqs[i]) - self.plen[i])
        slot_of = dict(zip(take, free))
        for i in take:
            self.row_of[slot_of[i]], self.ngen[slot_of[i]] = i, 1
        by_group: dict[int, list[int]] = {}
        for i in take:
            if self.group[i] >= 0:
                by_group.setdefault(self.group[i], []).append(slot_of[i])
        for g, slots in by_group.items():
            if g not in self.prefixes:
                self.prefixes[g] = self._prefix_kv(self.ptoks[g])
            idx = torch.tensor(slots, device=self.dev)
            m = len(self.ptoks[g])
            for layer, (pk, pv) in enumerate(self.prefixes[g]):
                self.cache.alloc(layer, pk)
                self.cache.k[layer][idx, :, :m] = pk
                self.cache.v[layer][idx, :, :m] = pv
        start, st = 0, self.st
        while start < len(take):
            end = start + 1
            while end < len(take) and (end + 1 - start) * (len(seqs[take[end]]) - self.plen[take[end]]) \
                    <= self.prefill_tokens:
                end += 1
            chunk = take[start:end]
            slots = torch.tensor([slot_of[i] for i in chunk], device=self.dev)
            first = self._prefill_forward(self.cache, slots, [seqs[i][self.plen[i]:] for i in chunk],
                                          [self.plen[i] for i in chunk]).argmax(-1)
            st["tok"][slots] = first
            st["pos"][slots] = torch.tensor([len(seqs[i]) for i in chunk], device=self.dev)
            st["ngen"][slots] = 1
            st["out"][slots, 0] = first
            st["done"][slots] = (first[:, None] == self.eos).any(-1) | (self.max_new <= 1)
            start = end

    def _compact(self, live: list[int], b: int, lens: list[int]) -> int:
        """Halve the bucket while it stays at most half full, moving the live rows to its front."""
        while b // 2 >= max(len(live), self.min_rows):
            b //= 2
        m = len(live)
        if live != list(range(m)):
            self.stats["compactions"] += 1
            idx = torch.tensor(live, device=self.dev)
            need = min(self.cache.length,
                       _round_up(max(lens[self.row_of[s]] + self.ngen[s] for s in live) + 1, 64))
            for k, v in zip(self.cache.k, self.cache.v):
                k[:m, :, :need] = k[idx, :, :need]
                v[:m, :, :need] = v[idx, :, :need]
            for t in self.st.values():
                t[:m] = t[idx]
            self.row_of[:m] = [self.row_of[s] for s in live]
            self.ngen[:m] = [self.ngen[s] for s in live]
        self.row_of[m:] = [-1] * (len(self.row_of) - m)
        self.st["done"][m:] = True
        return b

    # runtime monitor ---------------------------------------------------------------------------
    def _monitored_step(self, b: int, width: int, stopped: set[int]) -> None:
        if self.monitor is None:
            self._run_step(b, width)
            return
        # Rows feeding a generated token this step (the host must look: eager, every step).
        watch = [s for s, d in enumerate(self.st["done"][:b].tolist()) if self.row_of[s] >= 0 and not d]
        self._decoding = True
        try:
            self._run_step(b, width)
        finally:
            self._decoding = False
        if watch:
            flags = torch.as_tensor(self.monitor(self._h[watch], [self.row_of[s] for s in watch]))
            hit = [s for s, f in zip(watch, flags.tolist()) if f]
            if hit:
                stopped.update(self.row_of[s] for s in hit)
                self.st["done"][torch.tensor(hit, device=self.dev)] = True

    def _monitor_hook(self):
        slot, n = self.monitor.slot, len(self.blocks)
        if not 0 <= slot <= n:
            from harc.errors import HarcError

            raise HarcError(f"monitor slot {slot} is outside 0..{n} (the model has {n} blocks)")

        def keep(h: Tensor) -> None:
            if self._decoding:
                self._h = h[:, -1]

        if slot < n:
            def pre(_m, args, kwargs):
                keep(args[0] if args else kwargs["hidden_states"])
            return self.blocks[slot].register_forward_pre_hook(pre, with_kwargs=True)

        def post(_m, _a, out):
            keep(out[0] if isinstance(out, tuple) else out)
        return self.blocks[-1].register_forward_hook(post)
