"""Where does the base model register harm inside a jailbreak prompt?

For each attack, p_harm = cos(residual at layer L, v_harm[L]) of the undefended model is read at
the last user-content token t_inst (what HARC's prompt coupling reads), at the last token of the
embedded request (where the attack keeps it verbatim), and averaged over the user content.
Offline, on the built-in Qwen2.5-Coder-0.5B-Instruct, CPU (docs/results/README.md):

    python docs/results/harm_positions.py --n 40 --layer 17
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from harc import ChatFormat, load_model
from harc.activations import ResidualCapture, iter_prompt_acts
from harc.data import prepare_sets
from harc.data.profile import DataProfile
from harc.eval.attacks import get_attack

ATTACKS = ["direct", "dan", "aim", "evil_confidant", "wild", "pap", "refusal_suppression",
           "prefix_injection", "style_injection", "deep_inception", "code_attack"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--layer", type=int, default=17)
    ap.add_argument("--n-extract", type=int, default=180)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model, dtype=torch.float32)
    chat = ChatFormat(tok, max_prompt_tokens=8192)  # the replication's template, never truncated
    sets = prepare_sets(DataProfile(harmful="advbench", harmful_eval="harmbench",
                                    harmless="harc-benign", pseudo="harc-pseudo-harmful"), seed=0)

    # v_harm at the layer, from the same extraction sets as the replication run.
    means = []
    for side in ("harmful_extract", "harmless_extract"):
        prompts = [r["prompt"] for r in sets[side][: a.n_extract]]
        acts = torch.cat([v["inst"][:, 0] for v in
                          iter_prompt_acts(model, chat, prompts, slots=[a.layer], batch_size=16)])
        means.append(acts.mean(0))
    v_harm = F.normalize(means[0] - means[1], dim=-1)

    requests = [{"prompt": r["prompt"]} for r in sets["harmful_eval"][: a.n]]
    cap = ResidualCapture(model, [a.layer], stop_early=True)
    print(f"layer {a.layer}, {a.n} HarmBench requests; p_harm of the base model at:")
    print(f"{'attack':20s} {'t_inst':>7s} {'request end':>12s} {'user mean':>10s}  verbatim")
    for name in ATTACKS:
        cols = {"t_inst": [], "request end": [], "user mean": []}
        for probe in get_attack(name).apply(requests):  # PAP gives several per request
            text = chat.render(probe.prompt)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor([enc["input_ids"]])
            h = cap.run(model, input_ids=ids, attention_mask=torch.ones_like(ids))[a.layer][0]
            p = F.cosine_similarity(h.float(), v_harm[None], dim=-1)
            n = ids.shape[1]
            user = slice(chat.head_len, n - chat.tail_len)
            cols["t_inst"].append(float(p[n + chat.t_inst]))
            cols["user mean"].append(float(p[user].mean()))
            request = probe.source_prompt.strip()
            at = text.find(request)
            if at >= 0:
                end = at + len(request)
                last = max(i for i, (s, _) in enumerate(enc["offset_mapping"]) if s < end)
                cols["request end"].append(float(p[last]))
        m = {k: (f"{statistics.mean(v):+.3f}" if v else "-") for k, v in cols.items()}
        print(f"{name:20s} {m['t_inst']:>7s} {m['request end']:>12s} {m['user mean']:>10s}  "
              f"{len(cols['request end'])}/{len(cols['t_inst'])}", flush=True)


if __name__ == "__main__":
    main()
