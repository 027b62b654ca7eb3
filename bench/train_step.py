"""Time one HARC training micro-step (forward + backward) at a given model scale; JSON to stdout.

    python bench/train_step.py --arch qwen2-7b [--tokenizer Qwen2.5-7B-Instruct.gguf]  # GPU
    python bench/train_step.py --arch tiny                                          # CPU, seconds
    python bench/train_step.py --model smollm2-135m-instruct --lens 96-160           # CPU
    python bench/train_step.py --arch qwen2-7b --variants peft,fused,compiled        # ablation
    python bench/train_step.py --arch qwen2-7b --variants compiled --accum 1,2       # as trained

What is timed is `harc.methods.harc.micro_step`, the trainer's own code: 6 harmful + 4 harmless + 2 pseudo
rows, LoRA r32/a64 on the seven projections, prompt + response coupling on K=4 layers, KL retain
(base forward under `disable_adapter`, retain rows only) and CE, then backward. `--arch qwen2-7b`
builds Qwen2.5-7B dimensions with random bf16 weights directly on the GPU (no download). Row lengths
are drawn in `--lens` (default 320-424 tokens, as in HARC-METHOD §8); without `--tokenizer` the ids
are synthetic (a 5-token template tail, as in Qwen's chat template).

Compute floor (§8): 2 * P_lin * (T_pad + T_pad + T_base) + 2 * d * V * (3 N_head + N_kl)
+ attention (4 T^2 d per layer and row for the adapted forward, twice that for its input-gradient
backward, once more for the base rows), at `--peak-tflops` (700 by default, H100/H200 bf16 dense).
P_lin = parameters of the decoder blocks' linear layers; T_pad = padded tokens of the adapted forward
(its backward needs input gradients only, about the same FLOPs); T_base = padded tokens of the base
forward; N_head = positions through the LM head with gradient (forward, recompute, input-gradient
backward), N_kl = the same positions of the base for KL. `floor_fraction` = floor / median step.
`host_median_s`: median time until `micro_step` returns, every kernel launched but not finished;
close to `median_s`, the step is bound by the host's launches rather than by the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import harc.methods.harc as hm  # noqa: E402
import harc.methods.step as step_mod  # noqa: E402
from harc.chat import ChatFormat, PairEncoding  # noqa: E402
from harc.directions import Directions  # noqa: E402
from harc.lora import attach_lora  # noqa: E402
from harc.methods.batching import Example, collate  # noqa: E402
from harc.methods.harc import micro_step  # noqa: E402
from harc.methods.step import KLCache, compiled_blocks, kl_reference, set_checkpointing  # noqa: E402
from harc.models import decoder_layers, unwrap  # noqa: E402

FUSED = hm.fused_lora
SWITCHES = {"harc": getattr(step_mod, "adapter_disabled", None),
            "peft": lambda model: model.disable_adapter()}
KEEP = contextlib.ExitStack()  # holds the compiled blocks until the process ends

ARCHS = {
    "qwen2-7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                     tie_word_embeddings=False),
    "tiny": dict(num_hidden_layers=6, hidden_size=64, intermediate_size=128,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=2048, tie_word_embeddings=False),
}
ANCHORS = {  # HARC-METHOD §8: the reference implementation at Qwen2.5-7B scale
    "reference_h100": "out of memory",
    "reference_h200": {"median_s": 0.83, "tokens_per_s": 1135, "peak_allocated_gb": 90.2},
    "compute_floor_s": 0.27,
}
COUNTS = (("harmful", 6), ("harmless", 4), ("pseudo", 2))


def build_model(args, device: str, dtype: torch.dtype):
    if args.model:
        from harc.models import load_model

        return load_model(args.model, device=device, dtype=dtype, attn_implementation="sdpa")
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**ARCHS[args.arch], use_cache=False)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        p = Path(args.tokenizer)
        tok = (AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
               if p.suffix == ".gguf" else AutoTokenizer.from_pretrained(str(p)))
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
    return model.eval(), tok


class Rows:
    """Random (prompt, response) rows whose total lengths lie in [lo, hi] tokens."""

    def __init__(self, tok, vocab: int, lo: int, hi: int, seed: int):
        self.rng = random.Random(seed)
        self.lo, self.hi, self.vocab = lo, hi, vocab
        self.chat = None
        if tok is not None:
            raw = None if getattr(tok, "chat_template", None) else "qwen"
            self.chat = ChatFormat(tok, raw_template=raw, max_prompt_tokens=max(256, hi),
                                   max_response_tokens=max(256, hi))
            self.words = [w for w in (tok.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha()]
        self.tail_len = self.chat.tail_len if self.chat else 5
        self.pad_id = tok.pad_token_id if tok is not None else 0

    def example(self, kind: int) -> Example:
        total = self.rng.randint(self.lo, self.hi)
        r_len = self.rng.randint(max(total - 256, 16), max(min(256, total - 32), 16))
        if self.chat is None:
            ids = [self.rng.randrange(10, self.vocab - 1) for _ in range(total)]
            enc = PairEncoding(ids, total - r_len, r_len)
        else:
            text = lambda n: " ".join(self.rng.choice(self.words) for _ in range(n))  # noqa: E731
            tok = self.chat.tokenizer
            # Real template around random words; the content is cut to the drawn token counts.
            p = self.chat.encode_prompt(text(total - r_len))
            keep = max(total - r_len - self.chat.head_len - self.tail_len, 1)
            p = p[: self.chat.head_len] + p[self.chat.head_len: -self.tail_len][:keep] + \
                p[-self.tail_len:]
            r = tok(text(r_len), add_special_tokens=False)["input_ids"][: r_len - 1]
            r = r + [tok.eos_token_id]
            enc = PairEncoding(p + r, len(p), len(r))
        return Example(enc, kind, min(32, enc.resp_len))

    def batch(self):
        exs = [self.example(k) for k, (_, n) in enumerate(COUNTS) for _ in range(n)]
        return collate(exs, self.tail_len, self.pad_id, multiple=8)


def floor_seconds(model, mb, peak_tflops: float) -> float:
    base = unwrap(model)
    cfg = base.config
    blocks = decoder_layers(base)
    p_lin = sum(m.weight.numel() for m in blocks.modules()
                if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
    B, T = mb.ids.shape
    rr = len(mb.retain_rows)
    t_base = rr * (T - mb.retain_trim)
    n_head = len(mb.ce_rows) + len(mb.kl_rows)
    d, V, L = cfg.hidden_size, cfg.vocab_size, len(blocks)
    attn = 4 * d * L * (3 * B * T * T + rr * (T - mb.retain_trim) ** 2)
    flops = 2 * p_lin * (2 * B * T + t_base) + 2 * d * V * (3 * n_head + len(mb.kl_rows)) + attn
    return flops / (peak_tflops * 1e12)


def run(model, rows: Rows, dirs, layers, args, device: str, ckpt: bool,
        hits: float | None = None, k: int = 1) -> dict:
    """Median micro-step; with `hits`, under `kl_cache`, where that share of each micro-batch's
    retain rows (rounded) was seen before: their reference states are put in the cache untimed.
    With k > 1 (--accum), the trainer's optimizer step is timed instead and divided by K: K
    micro-steps launched back to back (the trainer syncs once per optimizer step, so a micro-step's
    launches overlap the GPU's tail of the one before), gradient clipping and AdamW on the
    adapter, as harc.methods.engine runs them."""
    set_checkpointing(model, ckpt)
    model.train()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6) if k > 1 else None  # the trainer's optimizer
    times, hosts, real, padded, floors, warm = [], [], [], [], [], []
    groups = [[rows.batch().to(device) for _ in range(k)] for _ in range(args.warmup + args.n)]
    # Each timed group also runs once untimed, first: a shape's first step pays one-offs
    # (allocator growth, a recompile) that a long run pays once, not every step.
    order = groups[:args.warmup] + groups[args.warmup:] * 2
    try:
        for i, group in enumerate(order):
            caches = [primed_cache(model, mb, hits) for mb in group]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses = []
            for mb, cache in zip(group, caches):
                terms, _ = micro_step(model, mb, dirs, layers, margin=0.5,
                                      backward_scale=0.5 if k == 1 else 1.0 / k,
                                      chunk=args.chunk, kl_cache=cache)
                losses.append(sum(terms.values()))
            if opt is not None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            host = time.perf_counter() - t0  # every kernel launched; the GPU may still be busy
            loss = float(sum(losses))  # syncs, like the trainer's check
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / k
            for p in model.parameters():
                p.grad = None
            if i < args.warmup + args.n:  # includes any torch.compile time
                warm.append(dt)
            else:
                times.append(dt)
                hosts.append(host / k)
                real.append(statistics.mean(mb.n_real for mb in group))
                padded.append(statistics.mean(mb.n_padded for mb in group))
                floors.append(statistics.mean(floor_seconds(model, mb, args.peak_tflops)
                                              for mb in group))
    except torch.OutOfMemoryError:
        for p in model.parameters():
            p.grad = None
        return {"gradient_checkpointing": ckpt, "error": "out of memory",
                "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    med = statistics.median(times)
    out = {
        "gradient_checkpointing": ckpt, "accum": k, "median_s": round(med, 4),
        "mean_s": round(statistics.mean(times), 4), "min_s": round(min(times), 4),
        "host_median_s": round(statistics.median(hosts), 4),
        "tokens_per_s": round(statistics.mean(real) / med, 1),
        "padded_tokens_per_s": round(statistics.mean(padded) / med, 1),
        "real_tokens": round(statistics.mean(real)), "padded_tokens": round(statistics.mean(padded)),
        "last_loss": round(loss, 4), "warmup_s": [round(t, 2) for t in warm],
        "times_s": [round(t, 3) for t in times],
    }
    if cuda:  # the floor assumes a GPU's bf16 peak; on CPU it means nothing
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["floor_s"] = float(f"{statistics.mean(floors):.4g}")
        out["floor_fraction"] = round(statistics.mean(floors) / med, 3)
    return out


def primed_cache(model, mb, hits: float | None) -> KLCache | None:
    """With `hits`, a KLCache holding the reference states of that share (rounded) of mb's retain
    rows, computed untimed; else None."""
    if hits is None:
        return None
    cache = KLCache()
    kl_reference(model, mb, cache)
    for k in mb.retain_keys[round(hits * len(mb.retain_keys)):]:
        del cache.rows[k]
    return cache


def kl_shares(args) -> list[float]:
    """The --kl-cache shares; --profile and --sync-debug step under the first."""
    return [float(x) for x in args.kl_cache.split(",") if x]


def first_hits(args) -> float | None:
    return next(iter(kl_shares(args)), None)


def profile_step(model, rows: Rows, dirs, layers, args, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    mb = rows.batch().to(device)
    for i in range(2):
        cache = primed_cache(model, mb, first_hits(args))
        with profile(activities=acts) if i else _null() as prof:
            micro_step(model, mb, dirs, layers, margin=0.5, backward_scale=0.5, chunk=args.chunk,
                       kl_cache=cache)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        for p in model.parameters():
            p.grad = None
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30), file=sys.stderr)


def sync_debug(model, rows: Rows, dirs, layers, args, device: str) -> None:
    import traceback
    import warnings

    seen: dict[str, int] = {}

    def show(message, *_a, **_k):
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "/torch/" not in f.filename and "warnings" not in f.filename][-3:]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        seen[key] = seen.get(key, 0) + 1

    mb = rows.batch().to(device)
    cache = primed_cache(model, mb, first_hits(args))
    torch.cuda.synchronize()
    old = warnings.showwarning
    warnings.showwarning = show
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            micro_step(model, mb, dirs, layers, margin=0.5, backward_scale=0.5, chunk=args.chunk,
                       kl_cache=cache)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    for p in model.parameters():
        p.grad = None
    for k, n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"sync x{n}: {k}", file=sys.stderr)


def set_variant(model, variant: str) -> None:
    """peft: PEFT's own LoRA forward (the baseline); fused: harc's (what the trainer runs);
    compiled: fused, with the decoder blocks compiled as under `compile: true` (last: it keeps
    them compiled)."""
    hm.fused_lora = contextlib.nullcontext if variant == "peft" else FUSED
    if variant == "compiled":
        KEEP.enter_context(compiled_blocks(model))  # the trainer's `compile: true`
    elif variant not in ("peft", "fused"):
        raise SystemExit(f"unknown variant {variant!r}")


def set_switch(switch: str) -> None:
    """The reference forward's adapter switch: harc's `adapter_disabled`, or PEFT's
    `disable_adapter` (its model-status report costs ~0.1 s of host time per call at 7B). A harc
    tree from before the switch (a baseline run of older code) calls PEFT's whatever is asked."""
    if switch not in SWITCHES:
        raise SystemExit(f"unknown adapter switch {switch!r}")
    if SWITCHES["harc"] is not None:
        step_mod.adapter_disabled = SWITCHES[switch]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    ap.add_argument("--model", help="a harc model spec instead of --arch (its tokenizer is used)")
    ap.add_argument("--tokenizer", help="tokenizer folder or .gguf for --arch (else synthetic ids)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--lens", default="320-424", help="row length range in tokens, lo-hi")
    ap.add_argument("--n", type=int, default=5, help="timed micro-steps (optimizer steps with --accum)")
    ap.add_argument("--accum", default="1", metavar="K,...",
                    help="micro-steps per timed unit, each in turn: 1 times micro-steps alone; K > 1 "
                         "times optimizer steps of K micro-steps as the trainer runs them (one sync "
                         "per optimizer step, AdamW included), per micro-step")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed micro-steps before the timed ones (each timed one also runs once untimed)")
    ap.add_argument("--grad-ckpt", choices=("off", "on", "both"), default="both")
    ap.add_argument("--layers", default=None, help="coupled slots, e.g. 21,22,23,24 (default: 4 "
                    "slots at 3/4 depth)")
    ap.add_argument("--chunk", type=int, default=1024, help="LM-head chunk (positions)")
    ap.add_argument("--peak-tflops", type=float, default=700.0)
    ap.add_argument("--kl-cache", default="", metavar="F,...",
                    help="also time each variant under kl_cache with these shares of retain rows "
                         "seen before (e.g. 0.8,1: the paper configs draw each retain row 3-35 "
                         "times); the floor stays the uncached one")
    ap.add_argument("--adapter-switch", default="harc", metavar="S,...",
                    help="how the reference forward turns the adapter off, each timed in turn: "
                         "harc (harc.lora.adapter_disabled, the trainer's) and/or peft "
                         "(PeftModel.disable_adapter, the baseline before it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="fused",
                    help="comma-separated, in order: peft, fused, compiled (see set_variant)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="list where one micro-step (under the first --kl-cache share, if any) "
                         "synchronises host and GPU (stderr)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one micro-step (under the first --kl-cache share, "
                         "if any) and print its top ops to stderr")
    args = ap.parse_args(argv)
    if not all(x.isdigit() and int(x) >= 1 for x in args.accum.split(",")):
        ap.error(f"--accum: {args.accum!r} is not a comma-separated list of integers >= 1")
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    model, tok = build_model(args, device, dtype)
    vocab = unwrap(model).config.vocab_size
    build_s = time.perf_counter() - t0
    n_layers = len(decoder_layers(model))
    torch.manual_seed(args.seed)
    model = attach_lora(model, r=32, alpha=64, dropout=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    d = unwrap(model).config.hidden_size
    unit = lambda: torch.nn.functional.normalize(torch.randn(n_layers + 1, d, generator=gen), dim=-1)  # noqa: E731
    dirs = Directions(unit(), unit(), unit(), unit(), norms={}).to(device)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              [min(3 * n_layers // 4 + i, n_layers) for i in range(-2, 2)])
    lo, hi = (int(x) for x in args.lens.split("-"))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    accums = [int(x) for x in args.accum.split(",")]
    results = []
    for variant in args.variants.split(","):
        set_variant(model, variant)
        for switch in args.adapter_switch.split(","):
            set_switch(switch)
            for ckpt in modes:
                for hits, k in itertools.product([None, *kl_shares(args)], accums):
                    rows = Rows(tok, vocab, lo, hi, args.seed)  # same rows for every run
                    results.append({"variant": variant, "adapter_switch": switch,
                                    "kl_cache_hits": hits,
                                    **run(model, rows, dirs, layers, args, device, ckpt, hits, k)})
    if args.sync_debug and device.startswith("cuda"):
        sync_debug(model, Rows(tok, vocab, lo, hi, args.seed), dirs, layers, args, device)
    if args.profile:
        profile_step(model, Rows(tok, vocab, lo, hi, args.seed), dirs, layers, args, device)
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": args.model or args.arch, "dtype": str(dtype).replace("torch.", ""),
        "n_layers": n_layers, "hidden_size": d, "vocab_size": vocab, "layers": layers,
        "tokenizer": "synthetic ids" if tok is None else type(tok).__name__,
        "micro_batch": dict(COUNTS), "lens": [lo, hi], "timed_steps": args.n,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "build_s": round(build_s, 2), "runs": results, "anchors": ANCHORS,
    }
    KEEP.close()  # restore the blocks now, not in the interpreter's shutdown
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
