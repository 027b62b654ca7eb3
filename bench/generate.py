"""Greedy generation: harc's decoder against transformers' `generate` (the previous engine), in one
process, with the memory-bandwidth roofline. Writes JSON to --out after every case and prints a table.

    python bench/generate.py --out $OUT/generate.json               # GPU, every case (~3 min, H200)
    python bench/generate.py --quick --out /tmp/generate-quick.json  # CPU smoke test, under a minute
    python bench/generate.py --cases dims --decode-kernels sdpa/torch,triton/triton \
        --old-max-new-tokens 16 --out $OUT/generate-kernels.json  # decode kernels (~100 s, H200)
    python bench/generate.py --device cpu --cases real --model smollm2-135m-instruct \\
        --n-requests 8 --max-new-tokens 32 --batch-size 16 --out /tmp/generate-cpu.json

Cases (--cases, in this order; each one that fails is recorded and the next one runs):
- check: the unit tests' identity check on the device: tiny random models (sharpened so tokens
  depend on context) in float32 and bf16, prompts of several lengths, prefills, a shared template,
  extra EOS ids; rows whose tokens differ from transformers' generate are counted.
- dims: Qwen2.5-7B and Llama-3.1-8B dimensions (--archs) with random bf16 weights built on the
  device, --batches rows of random token prompts of --prompt-lens tokens, --max-new-tokens with
  no early stop. Each engine runs twice, with 1 and with N new tokens: ms per decode step is
  (t_N - t_1) / (N - 1), so prefill is left out. harc's decoder runs once per --decode-kernels
  variant ATTN/NORM[/ROPE[/PROJ[/STORE[/RESID]]]] (HARC_DECODE_ATTN=sdpa|triton,
  HARC_DECODE_NORM, _ROPE, _PROJ, _STORE and _RESIDUAL=torch|triton; `default` leaves them unset:
  triton on CUDA), recorded as new[VARIANT] (`new` for default). Its t_1 is taken once per
  NORM/ROPE/PROJ/RESID: prefill never runs the decode attention or the decode KV store.
  --old-max-new-tokens shortens the old engine's run (its ms per step from fewer steps;
  differing rows over those tokens). --repeats R runs harc's decoder R times per variant and
  records each run's ms per step and fraction of the floor, with the medians.
- real: --model (loaded with harc.models.load_model) on a realistic mix: harc attacks (--attacks,
  long templates such as dan included) applied to --n-requests HarmBench requests, plus as many
  plain benign prompts; EOS stops rows. Wall time of the whole set at --batch-size, and rows whose
  tokens differ between the engines; harc's decoder also once per attack, as the evaluator calls
  it (a lower bound on its speed-up: the old engine ran on the mixed set).

Roofline: one decode step reads every weight byte once (an untied input embedding excepted: a
step reads one row of it per sequence) plus each row's KV cache so far,
2 * layers * kv_heads * head_dim * seq_len * dtype bytes per row; averaged over the decode steps.
floor = bytes / --peak-bw (H200: 4.8e12 B/s); fraction = floor / measured ms per step. For `real`
the steps are harc's own, their time includes prefill, and the KV bytes are the rows' ideal ones.
--profile N adds, per `dims` batch on CUDA, the GPU time of a decode step by kernel kind (GEMM,
decode attention, norms, copies, other element-wise) and the GEMMs' FLOP rate, with and without
CUDA graphs.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harc.generation import eos_token_ids, generate_tokens, generate_tokens_hf  # noqa: E402
from harc.io import atomic_write_json  # noqa: E402

ARCHS = {
    "qwen2-7b": ("Qwen2Config", dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                     max_position_embeddings=32768, rms_norm_eps=1e-6,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                     tie_word_embeddings=False)),
    "llama3-8b": ("LlamaConfig", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      max_position_embeddings=131072, rms_norm_eps=1e-5,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                       "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192},
                                      tie_word_embeddings=False)),
    "smollm2-135m": ("LlamaConfig", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         max_position_embeddings=8192, rms_norm_eps=1e-5,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e5},
                                         tie_word_embeddings=True)),  # for CPU figures
    "tiny": ("LlamaConfig", dict(num_hidden_layers=4, hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                                 max_position_embeddings=4096, tie_word_embeddings=False)),
}
DEFAULT_ATTACKS = "direct,dan,aim,evil_confidant,refusal_suppression,prefix_injection,prefill"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def card(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")), platform.processor() or platform.machine())
    import os

    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def untied_embedding(model):
    """The input embedding's weight when the LM head has its own (a decode step reads one row of
    it per sequence, and it is a lookup, not a GEMM); None when they are tied."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return None if emb.data_ptr() == head.data_ptr() else emb


def model_bytes(model) -> tuple[int, int]:
    """(weight bytes one decode step reads, KV-cache bytes per token) of a decoder. An untied input
    embedding is left out: a step reads one of its rows per sequence, not the table."""
    from harc.models import decoder_layers, unwrap

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if (emb := untied_embedding(model)) is not None:
        weights -= emb.numel() * emb.element_size()
    cfg = unwrap(model).config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    elt = next(model.parameters()).element_size()
    return weights, 2 * len(decoder_layers(model)) * kv * head_dim * elt


def timed(dev, fn) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


@contextmanager
def kernels(variant: str):
    """HARC_DECODE_ATTN, _NORM, _ROPE, _PROJ, _STORE and _RESIDUAL set for a --decode-kernels
    variant ATTN/NORM[/ROPE[/PROJ[/STORE[/RESID]]]]."""
    names = ("HARC_DECODE_ATTN", "HARC_DECODE_NORM", "HARC_DECODE_ROPE", "HARC_DECODE_PROJ",
             "HARC_DECODE_STORE", "HARC_DECODE_RESIDUAL")
    old = {k: os.environ.get(k) for k in names}
    if variant != "default":
        for k, v in zip(names, variant.split("/")):
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_engine(engine: str, model, seqs, *, eos, pad, max_new, batch):
    """(tokens per row, seconds, stats) of one engine on token sequences."""
    out = [None] * len(seqs)

    def finish(rows, toks, _stopped):
        for r, t in zip(rows, toks):
            out[r] = t

    dev = next(model.parameters()).device
    stats = {}
    args = dict(eos_ids=eos, pad_id=pad, max_new_tokens=max_new, batch_size=batch, finish=finish)
    with torch.no_grad():
        if engine == "old":
            secs = timed(dev, lambda: generate_tokens_hf(model, seqs, **args))
        else:
            secs = timed(dev, lambda: stats.update(generate_tokens(model, seqs, **args)))
    return out, secs, stats


def warm(model, vocab: int, pad, variants=("default",)) -> None:
    """First calls pay lazy initialisation (cuBLAS handles, Triton compiles); keep it out of
    timings. A 300-token row makes the decode attention split its rows, as at batch 64."""
    seqs = [[random.randrange(10, vocab - 1) for _ in range(n)] for n in (40, 300)]
    run_engine("old", model, seqs, eos=[], pad=pad, max_new=4, batch=2)
    for v in variants:
        with kernels(v):
            run_engine("new", model, seqs, eos=[], pad=pad, max_new=4, batch=2)


def repeats(runs: list[dict]) -> dict:
    """Each run's ms per step and fraction of the floor (all steps, and replayed where there are
    graphs), with their medians."""
    out = {}
    for ms_key, frac_key in (("ms_per_step", "roofline"),
                             ("ms_per_replayed_step", "roofline_replayed")):
        if all(ms_key in r for r in runs):
            ms = [r[ms_key] for r in runs]
            frac = [r[frac_key]["fraction"] for r in runs]
            out[ms_key] = {"runs": ms, "median": statistics.median(ms)}
            out[f"{frac_key}_fraction"] = {"runs": frac, "median": statistics.median(frac)}
    return out


def new_key(variant: str) -> str:
    return "new" if variant == "default" else f"new[{variant}]"


def roofline(weights: int, kv_token: int, kv_tokens_per_step: float, ms_per_step: float, bw: float):
    step_bytes = weights + kv_token * kv_tokens_per_step
    floor_ms = step_bytes / bw * 1e3
    return {"bytes_per_step": step_bytes, "floor_ms_per_step": floor_ms,
            "fraction": floor_ms / ms_per_step if ms_per_step > 0 else None}


def differing(a: list, b: list) -> int:
    return sum(x != y for x, y in zip(a, b))


# cases ----------------------------------------------------------------------------------------------
def case_check(args, dev) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_model, tiny_tokenizer

    from harc.chat import ChatFormat

    prompts = ["How do I bake bread?", "Write a poem about the sea.", "hi",
               "Explain how to kill a Python process. " * 4, "system user assistant model " * 9,
               "Mix flour, water, salt and yeast.", "I'm sorry, but I can't help with that."]
    template = ("You are a helpful AI assistant. Cutting Knowledge Date: December 2023. The waves "
                "roll under a blue sky; mix flour, water, salt and yeast. " * 3 + "Now answer: {}")
    prompts += [template.format(p) for p in prompts[:5]]
    prefills = [None, "Sure, here is", None, None, "I'm sorry"] + [None] * (len(prompts) - 5)
    rec = {}
    for arch, tpl in (("llama", "llama3.1"), ("qwen2", "qwen2.5")):
        for dtype in (torch.float32, torch.bfloat16):
            tok, model = tiny_tokenizer(tpl), tiny_model(arch, hidden=64)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" not in name:
                        p.mul_(8.0)  # tokens that depend on their context (see the unit tests)
            model = model.to(dev, dtype)
            chat = ChatFormat(tok, max_prompt_tokens=480)
            seqs = [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
                    for p, f in zip(prompts, prefills)]
            kw = dict(pad=tok.pad_token_id, max_new=24, batch=4)
            ref, _, _ = run_engine("old", model, seqs, eos=eos_token_ids(model, tok), **kw)
            stop = max(((t, sum(t in r[1:] for r in ref)) for r in ref for t in r), key=lambda x: x[1])[0]
            eos = sorted({*eos_token_ids(model, tok), stop})
            ref, _, _ = run_engine("old", model, seqs, eos=eos, **kw)
            new, _, stats = run_engine("new", model, seqs, eos=eos, **kw)
            rec[f"{arch}-{str(dtype).split('.')[-1]}"] = {
                "rows": len(seqs), "differing_rows": differing(ref, new),
                "early_stops": sum(len(r) < 24 for r in ref), "stats": stats}
    return rec


def measure(engine: str, n_new: int, *, args, model, seqs, weights, kv_token, t1=None):
    """(tokens, t_1, record) of one engine on `seqs` without early stops: ms per decode step from
    the run with n_new tokens less the one with 1 (t_1, measured unless given)."""
    batch = len(seqs)
    if t1 is None:  # the faster of two: a first call at a new shape pays one-off set-up
        t1 = min(run_engine(engine, model, seqs, eos=[], pad=0, max_new=1, batch=batch)[1]
                 for _ in range(2))
    toks, tn, stats = run_engine(engine, model, seqs, eos=[], pad=0, max_new=n_new, batch=batch)
    # decode step j (1..n_new-1) reads each row's prompt plus j cached tokens: n_new/2 on average
    kv_per_step = sum(len(s) for s in seqs) + batch * n_new / 2
    ms = (tn - t1) / (n_new - 1) * 1e3
    rec = {"prefill_s": t1, "total_s": tn, "ms_per_step": ms, "tokens_per_s": batch * n_new / tn,
           "roofline": roofline(weights, kv_token, kv_per_step, ms, args.peak_bw),
           **({"stats": stats} if stats else {})}
    if stats.get("capture_s"):
        steady = (tn - t1 - stats["capture_s"]) / (n_new - 1) * 1e3
        rec["ms_per_step_without_captures"] = steady
        rec["roofline_without_captures"] = roofline(weights, kv_token, kv_per_step, steady, args.peak_bw)
        # replays only: each bucket's first step runs eagerly before its capture; over 128 new
        # tokens those few slow steps weigh on the mean, over a long evaluation they do not
        replays = n_new - 1 - stats.get("warmup_steps", 0)
        if replays > 0:
            ms = (tn - t1 - stats["capture_s"] - stats.get("warmup_s", 0.0)) / replays * 1e3
            rec["ms_per_replayed_step"] = ms
            rec["roofline_replayed"] = roofline(weights, kv_token, kv_per_step, ms, args.peak_bw)
    return toks, t1, rec


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("gemm", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "splitk")),
    ("attention (prefill)", ("flash", "fmha", "attention")),
    ("rms norm (triton)", ("rms_norm_rows",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)
DECODE_ATTN_KERNELS = ("fwd", "reduce")  # harc._decode_attn's Triton kernels, by their own names


def kernel_kind(name: str) -> str:
    if name in DECODE_ATTN_KERNELS:
        return "decode attention (triton)"
    low = name.lower()
    return next((k for k, subs in KERNEL_KINDS if any(s in low for s in subs)), "other element-wise")


def profile_decode(model, seqs, n_new: int, graphs: bool) -> dict:
    """GPU time per decode step by kernel kind: CUDA kernel time of a run with 2 n_new + 1 tokens
    less that of a run with n_new + 1, over n_new steps; also the FLOP rate of the GEMMs. Both runs
    prefill and warm up alike, so only decode steps remain (a 1-token run as the baseline left
    negative prefill residues under CUDA graphs in the 2026-12-01 profiles, and too low graph
    totals). Kernels replayed from CUDA graphs are counted where CUPTI reports them (`kernels`)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def kernels(max_new: int) -> dict[str, float]:
        by: dict[str, float] = {}
        with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
            generate_tokens(model, seqs, eos_ids=[], pad_id=0, max_new_tokens=max_new,
                            batch_size=len(seqs), finish=lambda *a: None, graphs=graphs)
            torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                by[e.name] = by.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
        return by

    short, long = kernels(n_new + 1), kernels(2 * n_new + 1)
    per = {k: (long.get(k, 0.0) - short.get(k, 0.0)) / n_new for k in long}
    kinds: dict[str, float] = {}
    for name, ms in per.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    n_mm = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    if (emb := untied_embedding(model)) is not None:
        n_mm -= emb.numel()
    flops = 2 * len(seqs) * n_mm
    gemm_ms = kinds.get("gemm", 0.0)
    top = sorted(per.items(), key=lambda kv: -kv[1])[:25]
    return {"graphs": graphs, "kernels": len(long), "gpu_ms_per_step": sum(kinds.values()),
            "ms_per_step_by_kind": kinds, "gemm_flops_per_step": flops,
            "gemm_tflops": flops / gemm_ms / 1e9 if gemm_ms > 0 else None,
            "top_kernels_ms_per_step": dict(top)}


def case_dims(args, dev, arch: str) -> dict:
    import transformers

    cls_name, dims = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**dims, use_cache=True)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: every row runs N tokens
    weights, kv_token = model_bytes(model)
    lo, hi = (int(x) for x in args.prompt_lens.split("-"))
    variants = args.decode_kernels.split(",")
    warm(model, cfg.vocab_size, 0, variants)
    out = {"arch": arch, "dtype": str(dtype), "weight_bytes": weights, "kv_bytes_per_token": kv_token,
           "batches": {}}
    n, n_old = args.max_new_tokens, args.old_max_new_tokens or args.max_new_tokens
    for batch in (int(b) for b in args.batches.split(",")):
        rng = random.Random(batch)
        seqs = [[rng.randrange(10, cfg.vocab_size - 1) for _ in range(rng.randint(lo, hi))]
                for _ in range(batch)]
        rec = {"rows": batch, "prompt_tokens": sum(map(len, seqs)), "max_new_tokens": n,
               "old_max_new_tokens": n_old}
        same = dict(args=args, model=model, seqs=seqs, weights=weights, kv_token=kv_token)
        old_toks, _, rec["old"] = measure("old", n_old, **same)
        prefill: dict[str, float] = {}  # t_1 per NORM/ROPE/PROJ/RESID setting
        first = None  # the first variant's tokens: a kernel that rounds alike changes none
        for v in variants:
            parts = v.split("/")
            norm = "/".join(parts[1:4] + parts[5:]) if v != "default" else v
            results = []
            for _ in range(args.repeats):
                with kernels(v):
                    got, prefill[norm], r = measure("new", n, t1=prefill.get(norm), **same)
                results.append((got, r))
            toks, r = results[0]  # the first run's tokens, beside its record
            runs = [run for _, run in results]
            if len(runs) > 1:  # one card's run-to-run spread, next to a bar it sits close to
                r["repeats"] = repeats(runs)
            r["speedup_decode"] = rec["old"]["ms_per_step"] / r["ms_per_step"]
            r["differing_rows"] = differing(old_toks, [t[:n_old] for t in toks])
            first = first or (new_key(v), toks)
            r[f"differing_rows_vs_{first[0]}"] = differing(first[1], toks)
            rec[new_key(v)] = r
        if args.profile and dev.type == "cuda":
            for graphs in (True, False):
                try:
                    rec[f"profile_{'graphs' if graphs else 'eager'}"] = profile_decode(
                        model, seqs, args.profile, graphs)
                except Exception as e:  # the timings above stand without it
                    rec[f"profile_{'graphs' if graphs else 'eager'}"] = {
                        "error": f"{type(e).__name__}: {e}"[:300]}
        out["batches"][str(batch)] = rec
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def mix(args, chat) -> tuple[list[str], list, list[str], dict]:
    """Attack probes on harmful requests plus plain benign prompts: (prompts, prefills, the set
    each prompt belongs to, counts)."""
    from harc.data import load
    from harc.eval.attacks import get_attack

    try:
        reqs = [{"prompt": r["prompt"]} for r in load("harmbench", limit=args.n_requests)]
    except Exception as e:  # HarmBench not reachable: harc's own pseudo-harmful set stands in
        print(f"harmbench unavailable ({e}); using harc-pseudo-harmful", file=sys.stderr)
        reqs = [{"prompt": r["prompt"]} for r in load("harc-pseudo-harmful", limit=args.n_requests)]
    prompts, prefills, labels, counts = [], [], [], {}
    for name in args.attacks.split(","):
        try:
            probes = get_attack(name).apply(reqs)
        except Exception as e:
            counts[name] = f"skipped: {type(e).__name__}: {e}"[:200]
            continue
        probes = [p for p in probes if p.steer is None]
        prompts += [p.prompt for p in probes]
        prefills += [p.prefill for p in probes]
        labels += [name] * len(probes)
        counts[name] = len(probes)
    benign = [r["prompt"] for r in load("harc-benign", limit=args.n_requests)]
    prompts += benign
    prefills += [None] * len(benign)
    labels += ["benign"] * len(benign)
    counts["benign"] = len(benign)
    return prompts, prefills, labels, counts


def case_real(args, dev) -> dict:
    from harc.chat import ChatFormat

    if args.model == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model("qwen2", hidden=64).to(dev), tiny_tokenizer("qwen2.5")
    else:
        from harc.models import load_model

        t0 = time.perf_counter()
        model, tok = load_model(args.model, device=str(dev))
        load_s = time.perf_counter() - t0
    chat = ChatFormat(tok, max_prompt_tokens=2048)
    prompts, prefills, labels, counts = mix(args, chat)
    seqs = [chat.encode_prompt(p) + (chat._tokenize(f) if f else []) for p, f in zip(prompts, prefills)]
    eos = eos_token_ids(model, tok)
    weights, kv_token = model_bytes(model)
    warm(model, len(tok), tok.pad_token_id)
    rec = {"model": args.model, "dtype": str(next(model.parameters()).dtype), "prompts": len(seqs),
           "by_attack": counts, "prompt_tokens": sum(map(len, seqs)),
           "max_prompt_tokens": max(map(len, seqs)), "batch_size": args.batch_size,
           "max_new_tokens": args.max_new_tokens, "weight_bytes": weights,
           "kv_bytes_per_token": kv_token}
    if args.model != "tiny":
        rec["load_s"] = load_s
    toks = {}
    for engine in ("old", "new"):
        toks[engine], secs, stats = run_engine(engine, model, seqs, eos=eos, pad=tok.pad_token_id,
                                               max_new=args.max_new_tokens, batch=args.batch_size)
        gen = sum(map(len, toks[engine]))
        rec[engine] = {"s": secs, "generated_tokens": gen, "tokens_per_s": gen / secs}
        if stats:
            rec[engine]["stats"] = stats
    steps = rec["new"]["stats"].get("steps", 0)
    if steps:
        # each row's decode steps read its prompt plus the tokens generated so far
        kv = sum((len(t) - 1) * len(s) + (len(t) - 1) * len(t) / 2 for s, t in zip(seqs, toks["new"]))
        ms = rec["new"]["s"] / steps * 1e3
        rec["new"]["wall_ms_per_step"] = ms
        rec["new"]["roofline"] = roofline(weights, kv_token, kv / steps, ms, args.peak_bw)
    rec["speedup"] = rec["old"]["s"] / rec["new"]["s"]
    # As the evaluator calls it: one call per attack (graph captures and a drain tail per call).
    per, secs = [None] * len(seqs), 0.0
    for name in counts:
        idx = [i for i, lab in enumerate(labels) if lab == name]
        if idx:
            got, s, _ = run_engine("new", model, [seqs[i] for i in idx], eos=eos,
                                   pad=tok.pad_token_id, max_new=args.max_new_tokens,
                                   batch=args.batch_size)
            secs += s
            for i, t in zip(idx, got):
                per[i] = t
    rec["new_one_call_per_attack"] = {"s": secs, "speedup_vs_old_mixed": rec["old"]["s"] / secs,
                                      "differing_rows_vs_old": differing(toks["old"], per)}
    rec["differing_rows"] = differing(toks["old"], toks["new"])
    diff = [i for i, (a, b) in enumerate(zip(toks["old"], toks["new"])) if a != b]
    rec["first_difference_at"] = [next(j for j, (x, y) in enumerate(zip(toks["old"][i] + [-1],
                                                                        toks["new"][i] + [-2])) if x != y)
                                  for i in diff[:20]]
    return rec


# driver -----------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = [f"{'case':34} {'old':>22} {'new':>22} {'speedup':>8} {'roofline':>9} {'diff rows':>9}"]
    for name, rec in result["cases"].items():
        if "error" in rec:
            lines.append(f"{name:34} ERROR {rec['error'][:80]}")
        elif name.startswith("dims"):
            for b, r in rec["batches"].items():
                o = r["old"]
                for key, n in r.items():
                    if not key.startswith("new"):
                        continue
                    lines.append(f"{name + ' b' + b + ' ' + key[3:].strip('[]'):34}"
                                 f" {o['ms_per_step']:8.2f} ms/step {o['tokens_per_s']:6.0f}/s"
                                 f" {n['ms_per_step']:8.2f} ms/step {n['tokens_per_s']:6.0f}/s"
                                 f" {n['speedup_decode']:7.1f}x {n['roofline']['fraction'] or 0:9.2f}"
                                 f" {n['differing_rows']:4d}/{r['rows']}")
        elif name.startswith("real"):
            o, n = rec["old"], rec["new"]
            frac = n.get("roofline", {}).get("fraction") or 0.0
            lines.append(f"{name:34} {o['s']:8.1f} s {o['tokens_per_s']:8.0f}/s {n['s']:8.1f} s"
                         f" {n['tokens_per_s']:8.0f}/s {rec['speedup']:7.1f}x {frac:9.2f}"
                         f" {rec['differing_rows']:4d}/{rec['prompts']}")
        else:
            for k, r in rec.items():
                if not isinstance(r, dict):
                    continue
                lines.append(f"{name + ' ' + k:34} {'':>22} {'':>22} {'':>8} {'':>9}"
                             f" {r['differing_rows']:4d}/{r['rows']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="tiny CPU configuration, under a minute")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cases", default="check,dims,real")
    ap.add_argument("--archs", default="qwen2-7b,llama3-8b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt-lens", default="300-600")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--old-max-new-tokens", type=int, default=None,
                    help="new tokens of the old engine in `dims` (default: --max-new-tokens)")
    ap.add_argument("--decode-kernels", default="default",
                    help="`dims`: harc's decoder once per ATTN/NORM[/ROPE[/PROJ[/STORE[/RESID]]]], e.g. "
                         "sdpa/torch/torch/torch,triton/triton/triton/triton")
    ap.add_argument("--repeats", type=int, default=1,
                    help="`dims`: runs of harc's decoder per variant; each run's figures and the "
                         "median are recorded under `repeats` (the first run's record stands)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--attacks", default=DEFAULT_ATTACKS)
    ap.add_argument("--n-requests", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256, help="rows in flight for `real`")
    ap.add_argument("--peak-bw", type=float, default=4.8e12, help="bytes/s (H200: 4.8e12)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="`dims` on CUDA: GPU time per decode step by kernel kind over N steps, "
                         "with and without CUDA graphs (torch.profiler)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    for v in args.decode_kernels.split(","):
        parts = v.split("/")
        if v != "default" and (len(parts) not in (2, 3, 4, 5, 6) or parts[0] not in ("sdpa", "triton")
                               or any(x not in ("torch", "triton") for x in parts[1:])):
            ap.error(f"--decode-kernels: {v!r} is not ATTN/NORM[/ROPE[/PROJ[/STORE[/RESID]]]] "
                     "(sdpa|triton, then torch|triton for each other) or default")
    if args.quick:
        args.device = args.device or "cpu"
        args.archs, args.batches, args.prompt_lens, args.max_new_tokens = "tiny", "8,16", "30-60", 16
        args.batch_size, args.n_requests, args.attacks = 8, 3, "direct,prefix_injection,prefill"
        from harc.io import cache_dir

        if not (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").exists():
            args.model = "tiny"
        elif args.model == "qwen2.5-coder-0.5b-instruct":
            args.model = "smollm2-135m-instruct"
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import transformers

    result = {"card": card(dev), "device": str(dev), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "peak_bw": args.peak_bw, "args": vars(args), "cases": {}}
    todo = []
    for c in args.cases.split(","):
        if c == "dims":
            todo += [(f"dims:{a}", lambda a=a: case_dims(args, dev, a)) for a in args.archs.split(",")]
        elif c == "real":
            todo.append((f"real:{args.model}", lambda: case_real(args, dev)))
        elif c == "check":
            todo.append(("check", lambda: case_check(args, dev)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, fn in todo:
        t0 = time.perf_counter()
        try:
            result["cases"][name] = fn()
        except Exception as e:  # unattended run: record and go on
            result["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:500],
                                     "traceback": traceback.format_exc()[-3000:]}
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        result["cases"][name]["case_s"] = time.perf_counter() - t0
        atomic_write_json(out, result)  # a kill mid-write keeps the cases written before
        print(f"[{name}] {result['cases'][name]['case_s']:.1f} s", file=sys.stderr, flush=True)
    print(result["card"], f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(table(result))


if __name__ == "__main__":
    main()
