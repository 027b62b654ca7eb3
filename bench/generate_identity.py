"""Greedy identity of harc's decoder on a real model: float32 tokens of the old engine
(transformers' `generate`) against harc's, and, as the bf16 noise floor, the old engine against
itself at two batch sizes (only the summation order changes). Writes JSON to --out.

    python bench/generate_identity.py --out $OUT/generate-identity.json   # GPU, about 1 min (H200)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import eos_token_ids, mix, run_engine  # noqa: E402

from harc.chat import ChatFormat  # noqa: E402
from harc.models import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n-requests", type=int, default=12)
    ap.add_argument("--attacks", default="direct,dan,refusal_suppression,prefill")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    mix_args = types.SimpleNamespace(n_requests=args.n_requests, attacks=args.attacks)
    # (dtype, engine A at batch, engine B at batch)
    pairs = [("float32", ("old", 256), ("new", 256)), ("bfloat16", ("old", 256), ("old", 8))]
    res = {"model": args.model, "card": torch.cuda.get_device_name() if torch.cuda.is_available()
           else "cpu", "torch": torch.__version__, "cases": {}}
    for dtype, a, b in pairs:
        model, tok = load_model(args.model, dtype=getattr(torch, dtype))
        chat = ChatFormat(tok, max_prompt_tokens=2048)
        prompts, prefills, _, _ = mix(mix_args, chat)
        seqs = [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
                for p, f in zip(prompts, prefills)]
        kw = {"eos": eos_token_ids(model, tok), "pad": tok.pad_token_id,
              "max_new": args.max_new_tokens}
        t0 = time.time()
        ta = run_engine(a[0], model, seqs, batch=a[1], **kw)[0]
        tb = run_engine(b[0], model, seqs, batch=b[1], **kw)[0]
        res["cases"][dtype] = {"rows": len(seqs), "differing": sum(x != y for x, y in zip(ta, tb)),
                               "compare": f"{a[0]} b{a[1]} vs {b[0]} b{b[1]}",
                               "s": time.time() - t0}
        print(dtype, res["cases"][dtype], flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
