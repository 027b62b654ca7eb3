"""On-policy training triples from the model itself (no Llama-3-generated targets).

For each harmful prompt: (prompt, refusal, harmful-completion opening); for each benign prompt:
(prompt, helpful answer), kept only when the model did answer (`answered_pairs`). The reference
takes every model's refusal targets from Llama-3 outputs, off-policy for any other model; here
both come from the model being hardened:
- refusal: the model's own greedy answer when it refuses; otherwise its answer with the refusal
  direction added at t_post onwards (activation addition); otherwise a short templated refusal
  in the model's style (its most common refusal opening);
- completion opening (only the first N tokens feed the response direction): the model's own
  answer when it complies; otherwise its answer with the refusal direction ablated; otherwise
  generated after an affirmative prefill.
Pseudo-harmful variants (`synth_pseudo`): the model's own paraphrase and benign framings of
benign-but-alarming prompts, with the model's answers, kept only where it answered.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.nn.functional as F

from harc import refusal
from harc._version import __version__
from harc.activations import MeanAccumulator, iter_prompt_acts
from harc.chat import ChatFormat
from harc.data.hygiene import dedupe_against, normalize
from harc.generation import Steer, generate
from harc.io import atomic_write_text, cache_dir, sha256_json
from harc.models import model_identity

TEMPLATED_REFUSAL = "I'm sorry, but I can't help with that request."

# Benign framings of a benign-but-alarming prompt: context a real user adds. None is a jailbreak
# template, asks to drop rules or to role-play, so a variant stays exactly as benign as its source.
PSEUDO_FRAMES = (
    "Quick question: {}",
    "I'm new to this and a bit confused. {}",
    "{} I'm asking for a school project.",
    "My friend asked me this and I didn't know the answer: {}",
    "{} Please keep the answer short.",
    "For a safety handout I'm writing: {}",
    "Serious question, I'm curious: {}",
    "{} I'd like to understand it properly.",
)
PARAPHRASE_TOKENS = 64  # a rewritten question is one line
PARAPHRASE = ("Rewrite the following request in different words, keeping its meaning. Reply with "
              "the rewritten request only.\n\n{}")


def style_refusal(own_refusals: Sequence[str]) -> str:
    """A refusal in the model's own words: the most common first sentence of its refusals, or a
    generic one when it refused fewer than three times (one odd refusal is no style)."""
    firsts = [re.split(r"(?<=[.!?])\s", r.strip(), maxsplit=1)[0] for r in own_refusals if r.strip()]
    return Counter(firsts).most_common(1)[0][0] if len(firsts) >= 3 else TEMPLATED_REFUSAL


def _refusal_judge() -> Callable[[list[str], list[str]], list[bool]]:
    # The refusal-string judge's own test (`harc.refusal`), without the judge plugin above us.
    return lambda prompts, responses: [refusal.is_refusal(r) for r in responses]


def answered_pairs(prompts: Sequence[str], answers: Sequence[str],
                   is_refusal: Callable[[list[str], list[str]], list[bool]] | None = None
                   ) -> tuple[list[dict], int]:
    """(prompt, response) pairs where the model answered, and how many it refused. A refusal is no
    retain example: the KL term would preserve that over-refusal (and, on the helpful side of the
    response directions, it blurs the refusal contrast); an empty answer is no target at all."""
    refused = (is_refusal or _refusal_judge())(list(prompts), list(answers))
    pairs = [{"prompt": p, "response": a} for p, a, r in zip(prompts, answers, refused, strict=True)
             if not r and a.strip()]
    return pairs, sum(refused)


def refusal_vectors(model, chat: ChatFormat, harmful: Sequence[str], harmless: Sequence[str],
                    batch_size: int = 16):
    """Raw difference of means at t_post per slot ([S, d]): the refusal direction with its norm."""
    means = []
    for prompts in (harmful, harmless):
        acc = MeanAccumulator()
        for views in iter_prompt_acts(model, chat, prompts, batch_size=batch_size):
            acc.add({"post": views["post"]})
        means.append(acc.mean("post"))
    return means[0] - means[1]


def synth_triples(model, chat: ChatFormat, harmful: Sequence[str], harmless: Sequence[str], *,
                  max_new_tokens: int = 64, completion_tokens: int = 32, batch_size: int = 16,
                  steer_layer: int | None = None, steer_scale: float = 1.0,
                  is_refusal: Callable[[list[str], list[str]], list[bool]] | None = None,
                  progress: Callable[[int], None] | None = None, use_cache: bool = True
                  ) -> tuple[list[dict], list[dict]]:
    """Return (triples for `harmful`, helpful pairs for `harmless`), cached by content hash."""
    settings = {"recipe": 4,  # bump when the way triples are made changes (invalidates caches)
                "max_new_tokens": max_new_tokens, "completion_tokens": completion_tokens,
                "steer_layer": steer_layer, "steer_scale": steer_scale,
                "template": chat.template_hash(), "model": model_identity(model)}
    key = sha256_json({"harmful": list(harmful), "harmless": list(harmless), **settings})[:24]
    path = cache_dir() / "synth" / f"{key}.json"
    if use_cache and path.exists():
        cached = json.loads(path.read_text())
        return cached["triples"], cached["helpful"]
    is_refusal = is_refusal or _refusal_judge()
    gen = dict(batch_size=batch_size, progress=progress)
    helpful = generate(model, chat, harmless, max_new_tokens=max_new_tokens, **gen)
    own = generate(model, chat, harmful, max_new_tokens=max_new_tokens, **gen)
    refused = is_refusal(list(harmful), own)

    diff = refusal_vectors(model, chat, harmful, harmless, batch_size)
    n_layers = diff.shape[0] - 1
    layer = steer_layer if steer_layer is not None else max(1, n_layers // 2)
    unit = F.normalize(diff, dim=-1)
    add = Steer("add", unit, alpha=steer_scale * float(diff[layer].norm()), slots=(layer,))
    ablate = Steer("ablate", unit)

    refusals = list(own)
    sources = ["own" if r else "" for r in refused]
    fallback = style_refusal([o for o, r in zip(own, refused) if r])
    todo = [i for i, r in enumerate(refused) if not r]
    if todo:
        steered = generate(model, chat, [harmful[i] for i in todo], max_new_tokens=max_new_tokens,
                           steer=add, **gen)
        ok = is_refusal([harmful[i] for i in todo], steered)
        for i, text, good in zip(todo, steered, ok):
            refusals[i], sources[i] = (text, "addition") if good else (fallback, "template")

    completions = [""] * len(harmful)
    comp_src = [""] * len(harmful)
    for i, r in enumerate(refused):
        if not r:
            completions[i], comp_src[i] = own[i], "own"
    todo = [i for i, r in enumerate(refused) if r]
    if todo:
        ablated = generate(model, chat, [harmful[i] for i in todo],
                           max_new_tokens=completion_tokens, steer=ablate, **gen)
        ok = is_refusal([harmful[i] for i in todo], ablated)
        retry = []
        for i, text, still in zip(todo, ablated, ok):
            if still:
                retry.append(i)
            else:
                completions[i], comp_src[i] = text, "ablation"
        if retry:
            prefills = ["Sure, here is"] * len(retry)
            forced = generate(model, chat, [harmful[i] for i in retry],
                              max_new_tokens=completion_tokens, prefills=prefills, **gen)
            for i, text in zip(retry, forced):
                completions[i], comp_src[i] = text, "prefill"

    # An empty generation (EOS first) is no training target: such rows are dropped and counted.
    triples = [{"prompt": p, "refusal": r, "completion": c, "refusal_source": rs,
                "completion_source": cs}
               for p, r, c, rs, cs in zip(harmful, refusals, completions, sources, comp_src)
               if r.strip() and c.strip()]
    pairs, n_refused = answered_pairs(harmless, helpful, is_refusal)
    dropped = {"triples": len(harmful) - len(triples), "helpful_refused": n_refused,
               "helpful_empty": len(harmless) - len(pairs) - n_refused}
    record = {"triples": triples, "helpful": pairs,
              "provenance": {**settings, "steer_layer": layer, "dropped": dropped,
                             "harc_version": __version__}}
    atomic_write_text(path, json.dumps(record, ensure_ascii=False))
    return triples, pairs


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def pseudo_frames(prompts: Sequence[str], n: int, seed: int = 0) -> list[list[str]]:
    """For each prompt, `n` (at most len(PSEUDO_FRAMES)) distinct framings of it, in a seeded
    order of its own."""
    out = []
    for i, p in enumerate(prompts):
        k = min(n, len(PSEUDO_FRAMES))
        order = random.Random(seed * 1_000_003 + i).sample(range(len(PSEUDO_FRAMES)), k)
        out.append([PSEUDO_FRAMES[k].format(p.strip()) for k in order])
    return out


def clean_paraphrase(source: str, text: str) -> str | None:
    """The first line of a paraphrase answer, without a label or quotes; None when it is no
    usable rewrite: a refusal, the source itself, an answer instead of a rewrite (a question
    rewritten must stay a question) or a length far from the source's (half to twice)."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    if not lines:
        return None
    line = re.sub(r"^(rewritten (question|request)|question|request|rewrite)\s*:\s*", "",
                  lines[0], flags=re.I)
    line = line.strip().strip("\"'`").strip()
    n, n_src = len(line.split()), len(source.split())
    if not max(4, n_src // 2) <= n <= 2 * n_src + 4 or refusal.is_refusal(line):
        return None
    if source.strip().endswith("?") and not line.endswith("?"):
        return None
    return None if normalize(line) == normalize(source) else line


def synth_pseudo(model, chat: ChatFormat, prompts: Sequence[str], n: int, *,
                 exclude: Sequence[str] = (), seed: int = 0, max_new_tokens: int = 128,
                 batch_size: int = 16,
                 is_refusal: Callable[[list[str], list[str]], list[bool]] | None = None,
                 use_cache: bool = True) -> tuple[list[dict], dict]:
    """(pairs, provenance): up to `n` variants of each pseudo-harmful prompt (the model's own
    paraphrase first, when usable, then framings from `PSEUDO_FRAMES`) with the model's answers.

    Variants near an `exclude` prompt (evaluation sets, XSTest) are dropped before answering;
    refused or empty answers are dropped after (`answered_pairs`: a refusal would anchor the
    over-refusal through the KL term). Cached by content hash.
    """
    settings = {"recipe": 1, "n": n, "seed": seed, "max_new_tokens": max_new_tokens,
                "template": chat.template_hash(), "model": model_identity(model)}
    key = sha256_json({"prompts": list(prompts), "exclude": sorted(exclude), **settings})[:24]
    path = cache_dir() / "synth" / f"pseudo-{key}.json"
    if use_cache and path.exists():
        cached = json.loads(path.read_text())
        return cached["pairs"], cached["provenance"]
    gen = dict(batch_size=batch_size)
    raw = generate(model, chat, [PARAPHRASE.format(p.strip()) for p in prompts],
                   max_new_tokens=PARAPHRASE_TOKENS, **gen)
    paras = [clean_paraphrase(p, text) for p, text in zip(prompts, raw, strict=True)]
    variants: list[str] = []
    for para, framed in zip(paras, pseudo_frames(prompts, n, seed), strict=True):
        variants += ([para] if para else []) + framed[: n - int(para is not None)]
    variants = list(dict.fromkeys(variants))  # exact repeats only: framings share the source
    kept, n_near = dedupe_against([{"prompt": v} for v in variants], [{"prompt": e} for e in exclude])
    variants = [r["prompt"] for r in kept]
    answers = generate(model, chat, variants, max_new_tokens=max_new_tokens, **gen)
    pairs, n_refused = answered_pairs(variants, answers, is_refusal)
    provenance = {**settings, "sources": len(prompts),
                  "paraphrases": sum(x is not None for x in paras), "variants": len(variants),
                  "near_excluded": n_near, "refused": n_refused, "kept": len(pairs),
                  "harc_version": __version__}
    atomic_write_text(path, json.dumps({"pairs": pairs, "provenance": provenance},
                                       ensure_ascii=False))
    return pairs, provenance

