"""Check the two paper configs at full scale with random weights: memory and one step of each stage.

GPU (H100 80GB / H200; both configs in a few minutes), from the checkout:

    export PYTHONPATH=/var/tmp/site:$PWD/src HARC_CACHE=$PWD/.carry/cache HARC_OFFLINE=1
    python bench/paper_configs.py --tokenizer .carry/tok-qwen [key=value ...]

(key=value: extra overrides as `harc run` takes them, e.g. compile=false to skip the one-time
torch.compile that the configs' `compile: true` costs in a 1-step run.)

CPU smoke test of the same code (12 layers, hidden 64, the real vocabularies; ~30 s on 2 cores):

    HARC_OFFLINE=1 python bench/paper_configs.py --scale tiny

For configs/llama3.1_8b.yaml and configs/qwen2_5_7b.yaml: build the paper model's architecture with
random bf16 weights directly on the device, save it (safetensors) with a tokenizer, write a run
config that is the paper config with only the model, output folder, offline data and sizes changed
(`overrides` in the record), run what `harc run` runs (`load_run_config` + `run_pipeline`), then
what `harc merge` runs (`merge_adapter`; one config only, as it writes a second full model). One
JSON record per config goes to stdout and, if $OUT is set, to $OUT/paper_configs.json. Stages are
delimited by the pipeline's own log lines (eval_harc also holds geometry_after and the report);
peak memory is torch's max_memory_allocated, reset at each stage start.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from harc.errors import HarcError  # noqa: E402

CONFIGS = {"llama3.1_8b": ROOT / "configs/llama3.1_8b.yaml",
           "qwen2_5_7b": ROOT / "configs/qwen2_5_7b.yaml"}
# The released models' config.json and generation_config.json (their sampling defaults too:
# harc's greedy generation has to override them).
ARCHS = {
    "llama3.1_8b": ("LlamaConfig", dict(
        num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
        dict(do_sample=True, temperature=0.6, top_p=0.9)),
    "qwen2_5_7b": ("Qwen2Config", dict(
        num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
             pad_token_id=151643, eos_token_id=[151645, 151643])),
}
# 12 layers: band [4, 4] must leave k_final = 4 eligible slots (4 <= l <= n_layers - 4).
TINY = dict(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2)
# Only sizes change; every method key (LoRA, batch 6+4+2, grad_accum, margin, weights, token
# limits, template, layer score, band, K, refresh, ramp) stays as released.
SIZES = {"steps": 1, "warmup_steps": 0, "checkpoint_every": 1}
RUN = {"n_extract": 8, "n_synth": 8, "plane_attacks": ["dan"]}
EVAL = {"attacks": ["direct", "dan"], "n_harmful": 4, "n_over_refusal": 4, "n_benign": 4,
        "n_capability": 4, "max_new_tokens": 8}

LLAMA_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>",
                 9: "<|eot_id|>", 10: "<|python_tag|>"}
# Llama-3.1-Instruct's template without tools: BOS, the default system header, user turns.
LLAMA_TEMPLATE = (
    "{{- bos_token }}{%- set system = '' %}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023"
    "\\nToday Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def llama_tokenizer(src: Path):
    """A Llama-3.1-shaped tokenizer from Qwen2.5's, as no Llama-3 one is available offline and
    Qwen's ids reach 151,935, past Llama's 128,256-row embedding. Qwen's merge of rank r makes
    token 256 + r, so its first 128,000 tokens and 127,744 merges are a consistent BPE; Llama
    3.1's specials take ids 128000-128255, so the template's header tokens are single tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((src / "tokenizer.json").read_text())
    bpe = spec["model"]
    bpe["vocab"] = {t: i for t, i in bpe["vocab"].items() if i < 128000}
    bpe["merges"] = bpe["merges"][: 128000 - 256]
    spec["added_tokens"] = [
        {"id": 128000 + i, "content": LLAMA_SPECIAL.get(i, f"<|reserved_special_token_{i}|>"),
         "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True} for i in range(256)]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=LLAMA_TEMPLATE)


def build(name: str, scale: str, tok_dir: Path, folder: Path, device: str) -> dict:
    """Random-weight model of the paper architecture + tokenizer, saved as a model folder."""
    import transformers

    cls, dims, gen = ARCHS[name]
    dims = {**dims, **(TINY if scale == "tiny" else {})}
    torch.manual_seed(0)
    with torch.device(device):  # no CPU copy: 16 GB initialised on the GPU in seconds
        model = transformers.AutoModelForCausalLM.from_config(
            getattr(transformers, cls)(**dims), dtype=torch.bfloat16)
    model.generation_config.update(**gen)
    model.save_pretrained(folder)
    del model
    llama = name.startswith("llama")
    tok = llama_tokenizer(tok_dir) if llama else transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(folder)
    note = ("no Llama-3 tokenizer offline: Qwen2.5's BPE cut to its first 128,000 tokens + "
            "Llama-3.1's special tokens at their ids and its chat template") if llama else "Qwen2.5"
    return {"arch": cls, **{k: v for k, v in dims.items() if k != "rope_parameters"},
            "tokenizer": note, "tokenizer_size": len(tok)}


def readable(spec: str) -> bool:
    from harc.data import load

    try:
        return bool(load(spec, limit=1))
    except HarcError:
        return False


def run_config(name: str, model_dir: Path, run_dir: Path, synth_tokens: int) -> tuple[Path, dict]:
    """The paper config with `overrides` applied, as a file `harc run --config` reads.

    A data entry that cannot be read offline (Circuit-Breakers, UltraChat, XSTest completions,
    Alpaca) becomes null: `harc run` then synthesises that training set on-policy from its default
    profile (AdvBench, harc-benign, harc-pseudo-harmful), as the built-in model configs do."""
    raw = yaml.safe_load(CONFIGS[name].read_text())
    data = raw.setdefault("data", {})
    over = {"model": str(model_dir), "output_dir": str(run_dir), **SIZES,
            "data": {k: None for k, v in data.items() if isinstance(v, str) and not readable(v)},
            "run": {**(raw.get("run") or {}), **RUN, "synth_tokens": synth_tokens},
            "eval": {**(raw.get("eval") or {}), **EVAL}}
    raw.update({k: v for k, v in over.items() if k != "data"})
    data.update(over["data"])
    path = run_dir / "run_config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, over


class StageClock:
    """The pipeline's `log` callback: each line starts a stage; time and peak memory per stage."""

    NAMES = {"loading": "load", "synthesising": "synth", "extracting": "extract",
             "diagnosing:": "diagnose", "training": "train"}

    def __init__(self, cuda: bool):
        self.cuda, self.stages, self.name, self.t0 = cuda, {}, None, 0.0

    def start(self, name: str | None) -> None:
        if self.name is not None:
            peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
            self.stages[self.name] = {"s": round(time.time() - self.t0, 2),
                                      "peak_gb": peak and round(peak, 2)}
        self.name, self.t0 = name, time.time()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def __call__(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] harc: {msg}", file=sys.stderr, flush=True)
        first, second = (msg.split() + [""])[:2]
        self.start("eval_" + second if first == "evaluating" else self.NAMES.get(first, first))


def check(name: str, args, device: str) -> dict:
    import peft
    import transformers

    from harc.export import merge_adapter
    from harc.models import environment
    from harc.pipeline import load_run_config, run_pipeline

    cuda = device == "cuda"
    work = args.root / name
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: no stage may be skipped
    model_dir, run_dir, merged = work / "model", work / "run", work / "merged"
    run_dir.mkdir(parents=True)
    rec = {"config": str(CONFIGS[name].relative_to(ROOT)), "scale": args.scale,
           "card": environment()["card"], "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    clock, t_all = StageClock(cuda), time.time()
    try:
        clock.start("build")
        rec["model"] = build(name, args.scale, args.tokenizer, model_dir, device)
        path, rec["overrides"] = run_config(name, model_dir, run_dir, args.synth_tokens)
        rec["overrides"]["command_line"] = args.overrides
        clock.start("data")
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON records only
            run_pipeline(load_run_config(path, args.overrides), log=clock)
        clock.start(None)
        results = json.loads((run_dir / "results.json").read_text())
        log = [json.loads(x) for x in (run_dir / "train/log.jsonl").read_text().splitlines()]
        step = next(r for r in log if "loss" in r)
        rec.update(
            pipeline_timings_s={k: round(v, 2) for k, v in results["timings_s"].items()},
            trainable_params=next(r for r in log if r.get("event") == "start")["trainable_params"],
            selected_layers={"diagnose_k_final": results["geometry"]["before"]["selected_layers"],
                             "train": step["layers"]},
            step={k: step[k] for k in ("loss", "couple", "couple_resp", "kl", "ce", "grad_norm",
                                       "lr", "tokens", "padded_tokens", "step_s")})
        if args.out:
            (args.out / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(run_dir / "results.json", args.out / name / "results.json")
        gc.collect()  # the pipeline's model must be gone before merge loads another copy
        if cuda:
            torch.cuda.empty_cache()
            rec["allocated_after_pipeline_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        if name == args.merge:
            clock.start("merge")
            dtype = getattr(torch, args.merge_dtype) if args.merge_dtype else None
            rec["merge_dtype"] = args.merge_dtype or "the config's"
            rec["merge_max_logit_diff"] = merge_adapter(str(model_dir), run_dir / "train/adapter",
                                                        merged, dtype=dtype)["max_logit_diff"]
            clock.start(None)
    except Exception as e:  # record it and go on: one GPU run should answer for both configs
        clock.start(None)
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(merged, ignore_errors=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    rec["stages"] = clock.stages
    if cuda:
        rec["peak_gb"] = max(s["peak_gb"] for s in clock.stages.values())
    rec["total_s"] = round(time.time() - t_all, 1)
    return rec


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".carry/tok-qwen",
                    help="Qwen2.5 tokenizer folder (the Llama one is derived from it)")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--merge", default="llama3.1_8b", help="config whose adapter `harc merge` "
                    "merges, or 'none'")
    ap.add_argument("--merge-dtype", choices=("bfloat16", "float32"), default=None,
                    help="dtype of the merge (default: the model's)")
    ap.add_argument("--synth-tokens", type=int, default=8, help="tokens per synthesised answer, "
                    "hence per training response; 256 gives paper-length training rows (about a "
                    "minute more per config on an H100)")
    ap.add_argument("overrides", nargs="*", help="more key=value overrides, as `harc run` takes "
                    "them (e.g. compile=false, gradient_checkpointing=true); none by default")
    ap.add_argument("--root", type=Path, default=Path("/var/tmp/paper-rand"),
                    help="models and runs go here; models are deleted after each config")
    args = ap.parse_args(argv)
    args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.scale == "full" and device != "cuda":
        ap.error("--scale full needs a GPU (7-8B models); use --scale tiny on CPU")
    records = []
    for name in args.configs:
        records.append(check(name, args, device))
        print(json.dumps(records[-1]), flush=True)
        if args.out:
            (args.out / "paper_configs.json").write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
