"""Where does the base model register harm inside a jailbreak prompt, and which reading sees it?

For each attack family, p_harm = cos(residual at layer L, v_harm[L]) of the undefended model is
read at the places HARC's `harm_read` can couple (before any training):
- `t_inst`: the last user-content token (the paper's reading);
- `request_end`: the last token of the embedded request, where the attack keeps it verbatim;
- `user_mean`: the mean over the user content;
- `max_user` / `softmax_user`: the maximum / soft maximum (temperature `--temp`) over the user
  content; `boundaries`: the maximum over sentence and line ends (`ChatFormat.boundaries`).
Each reading is taken with the t_inst direction (`dir=t_inst`) and, for the three new readings,
with v_harm re-extracted where it is read (`dir=read`, what `read_extract` trains with).
The same readings of benign and pseudo-harmful prompts say whether a reading also flags what
must not be refused: `auroc_vs_pseudo` is the probability that an attacked request reads higher
than a pseudo-harmful prompt (0.5: no separation).

Choices are made on validation data only: the requests are HarmBench's *validation* behaviours,
the pseudo-harmful prompts the training half of harc's set (the other half is evaluated).

    python docs/results/harm_positions.py --device cuda --n 60 --layers 13,17,21 \
        --json docs/results/harm_positions.json          # H200: well under a minute
    python docs/results/harm_positions.py --device cpu --n 20 --layers 17   # 2-core CPU: minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from harc import ChatFormat, load_model  # noqa: E402
from harc.activations import ResidualCapture, iter_prompt_acts  # noqa: E402
from harc.chat import left_pad  # noqa: E402
from harc.data import load, prepare_sets, split  # noqa: E402
from harc.data.profile import DataProfile  # noqa: E402
from harc.eval.attacks import get_attack  # noqa: E402
from harc.io import atomic_write_text  # noqa: E402
from harc.losses import read_projection  # noqa: E402
from harc.methods.harc_extras import read_direction  # noqa: E402

ATTACKS = ["direct", "dan", "aim", "evil_confidant", "wild", "pap", "refusal_suppression",
           "prefix_injection", "style_injection", "deep_inception", "code_attack"]
READINGS = ["t_inst", "request_end", "user_mean", "max_user", "softmax_user", "boundaries"]
NEW = {"max_user": ("max", False), "softmax_user": ("softmax", False), "boundaries": ("max", True)}


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """P(a positive reads higher than a negative), ties counted half."""
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def t_inst_directions(model, chat, harmful, harmless, layers, batch_size) -> torch.Tensor:
    """[len(layers), d] unit v_harm at t_inst (HARC-METHOD §2)."""
    means = []
    for prompts in (harmful, harmless):
        acts = torch.cat([v["inst"] for v in iter_prompt_acts(model, chat, prompts, slots=layers,
                                                               batch_size=batch_size)])
        means.append(acts.mean(0))
    return F.normalize(means[0] - means[1], dim=-1)


@torch.no_grad()
def readings(model, chat, items: Sequence[dict], dirs: dict[str, torch.Tensor], layers, *,
             temp: float, batch_size: int) -> dict:
    """{dir: {layer: {reading: [value per item]}}} for items {"text", "request"?}: the rendered
    prompt and, when it holds the request verbatim, that request."""
    tok, dev = chat.tokenizer, next(model.parameters()).device
    # The directions may live on different devices (one is read off the model): stack on `dev`.
    stack = {s: torch.stack([dirs[k][j].to(dev) for k in dirs]) for j, s in enumerate(layers)}
    out = {k: {s: {r: [] for r in READINGS} for s in layers} for k in dirs}
    for i in range(0, len(items), batch_size):
        batch = items[i: i + batch_size]
        encs = [tok(b["text"], add_special_tokens=False, return_offsets_mapping=True)
                for b in batch]
        seqs = [e["input_ids"] for e in encs]
        ids, mask, pos = left_pad(seqs, tok.pad_token_id, dev)
        T = ids.shape[1]

        def cos(slot, h):  # [B, T, K]: every token against every direction of the slot
            return F.cosine_similarity(h.float().unsqueeze(2), stack[slot][None, None], dim=-1)

        cap = ResidualCapture(model, layers, reduce=cos, stop_early=True)
        got = cap.run(model, input_ids=ids, attention_mask=mask, position_ids=pos)
        user = torch.zeros(len(batch), T, dtype=torch.bool)
        bound = torch.zeros(len(batch), T, dtype=torch.bool)
        ends: list[int | None] = []
        for r, (b, e, s) in enumerate(zip(batch, encs, seqs, strict=True)):
            o = T - len(s)
            user[r, o + chat.head_len: T - chat.tail_len] = True
            bound[r, [o + j for j in chat.boundaries(s)]] = True
            at = b["text"].find(b["request"]) if b.get("request") else -1
            end = at + len(b["request"]) if at >= 0 else None
            ends.append(None if end is None else
                        o + max(j for j, (a, _) in enumerate(e["offset_mapping"]) if a < end))
        user, bound = user.to(dev), bound.to(dev)
        for s in layers:
            for k_i, k in enumerate(dirs):
                p = got[s][..., k_i]  # [B, T]
                vals = {"t_inst": p[:, T + chat.t_inst],
                        "user_mean": (p * user).sum(1) / user.sum(1),
                        "max_user": read_projection(p[None], user, "max")[0],
                        "softmax_user": read_projection(p[None], user, "softmax", temp)[0],
                        "boundaries": read_projection(p[None], bound, "max")[0]}
                for name, v in vals.items():
                    out[k][s][name] += v.tolist()
                out[k][s]["request_end"] += [float(p[r, c]) for r, c in enumerate(ends)
                                             if c is not None]
    return out


def measure(model, chat, requests: Sequence[dict], harmless: dict[str, Sequence[str]],
            extract_harmful: Sequence[str], extract_harmless: Sequence[str], layers: Sequence[int],
            *, attacks: Sequence[str] = ATTACKS, temp: float = 0.1, batch_size: int = 16) -> dict:
    """The readings of every attack family and harmless set, summarised (see the module doc)."""
    layers = list(layers)
    base = t_inst_directions(model, chat, extract_harmful, extract_harmless, layers, batch_size)
    dirs = {"t_inst": base}
    for name, (mode, bounds) in NEW.items():
        dirs[f"read:{name}"], _ = read_direction(
            model, chat, extract_harmful, extract_harmless, base, mode=mode, boundaries=bounds,
            temp=temp, batch_size=batch_size, slots=layers)
    groups: dict[str, list[dict]] = {}
    for name in attacks:
        groups[name] = [{"text": chat.render(p.prompt), "request": p.source_prompt.strip()}
                        for p in get_attack(name).apply(list(requests))]
    for name, prompts in harmless.items():
        groups[f"harmless:{name}"] = [{"text": chat.render(p)} for p in prompts]
    raw = {g: readings(model, chat, items, dirs, layers, temp=temp, batch_size=batch_size)
           for g, items in groups.items()}
    table: dict = {}
    for g, by_dir in raw.items():
        table[g] = {"n": len(groups[g]), "request_found": len(by_dir["t_inst"][layers[0]]
                                                              ["request_end"])}
        for k, by_layer in by_dir.items():
            for s, cols in by_layer.items():
                cell = table[g].setdefault(k, {}).setdefault(str(s), {})
                for r, v in cols.items():
                    if k != "t_inst" and r not in (k.split(":")[1], "t_inst"):
                        continue  # a re-extracted direction is read where it was extracted
                    cell[r] = round(statistics.mean(v), 4) if v else None
                    # A plain prompt is its own request: its request end is t_inst.
                    r_pseudo = "t_inst" if r == "request_end" else r
                    pseudo = raw.get("harmless:pseudo", {}).get(k, {}).get(s, {}).get(r_pseudo)
                    if not g.startswith("harmless:") and pseudo:
                        cell.setdefault("auroc_vs_pseudo", {})[r] = (
                            round(auroc(v, pseudo), 4) if v else None)
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n", type=int, default=60, help="validation requests (HarmBench val: 60)")
    ap.add_argument("--requests", default="harmbench-val")
    ap.add_argument("--layers", default="17", help="comma-separated slots")
    ap.add_argument("--n-extract", type=int, default=180)
    ap.add_argument("--n-harmless", type=int, default=60)
    ap.add_argument("--temp", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--json", default=None, help="write the table here")
    a = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model, tok = load_model(a.model, device=a.device, dtype=dtype)
    chat = ChatFormat(tok, max_prompt_tokens=8192)  # the replication's template, never truncated
    sets = prepare_sets(DataProfile(harmful="advbench", harmful_eval="harmbench",
                                    harmless="harc-benign", pseudo="harc-pseudo-harmful"), seed=0)
    pseudo_train = split(sets["pseudo"], (0.5, 0.5), seed=0, names=("train", "eval"))["train"]
    layers = [int(x) for x in a.layers.split(",")]
    table = measure(
        model, chat, [{"prompt": r["prompt"]} for r in load(a.requests)[: a.n]],
        {"benign": [r["prompt"] for r in sets["harmless_validate"][: a.n_harmless]],
         "pseudo": [r["prompt"] for r in pseudo_train]},
        [r["prompt"] for r in sets["harmful_extract"][: a.n_extract]],
        [r["prompt"] for r in sets["harmless_extract"][: a.n_extract]], layers,
        attacks=a.attacks.split(","), temp=a.temp, batch_size=a.batch_size)
    rec = {"model": a.model, "device": a.device, "dtype": str(dtype), "requests": a.requests,
           "n": a.n, "layers": layers, "temp": a.temp, "seconds": round(time.time() - t0, 1),
           "table": table}
    s = str(layers[0])
    print(f"layer {s}, {a.n} {a.requests} requests; base p_harm (t_inst direction), and AUROC "
          "against pseudo-harmful prompts:")
    print(f"{'group':26s} " + " ".join(f"{r:>12s}" for r in READINGS))
    for g, row in table.items():
        cell = row["t_inst"][s]
        print(f"{g:26s} " + " ".join(f"{cell[r]:>+12.3f}" if cell.get(r) is not None
                                     else f"{'-':>12s}" for r in READINGS))
        if "auroc_vs_pseudo" in cell:
            au = cell["auroc_vs_pseudo"]
            print(f"{'  auroc vs pseudo':26s} " + " ".join(
                f"{au[r]:>12.2f}" if au.get(r) is not None else f"{'-':>12s}" for r in READINGS))
    if a.json:
        atomic_write_text(a.json, json.dumps(rec, indent=1))
    print(f"{rec['seconds']} s", flush=True)
    return rec


if __name__ == "__main__":
    main()
