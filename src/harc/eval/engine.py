"""Evaluation engine: attacks x prompts -> cached generations -> judges -> metrics.

A *policy* is a model, optionally with an adapter and a policy layer (`harc.eval.filters`): the
layer blocks prompts and/or wraps their generation. Each policy is run on the harmful requests
under every attack (attack success = the judge finds no refusal), on pseudo-harmful benign prompts
(over-refusal), on plain benign instructions, and on verifiable capability items; an adapted
model is also compared with its own base (adapter disabled) by KL and perplexity on benign
answers. Generations are cached by content hash in a JSON-lines file
appended as rows finish, so an interrupted evaluation resumes without regenerating.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from harc.chat import ChatFormat, left_pad
from harc.data.capability import check as check_capability
from harc.directions import prompt_projections, response_projections
from harc.distributed import World
from harc.errors import HarcError
from harc.eval.attacks import get_attack
from harc.eval.capability import lm_eval_scores
from harc.eval.config import EvalConfig
from harc.eval.filters import BLOCKED
from harc.eval.judges import get_judge
from harc.eval.judges.check import agreement
from harc.generation import Steer, generate, steering
from harc.io import sha256_file, sha256_json
from harc.models import load_model, model_identity
from harc.stats import rate, wilson


class GenerationCache:
    """JSON-lines store of generations keyed by (policy, prompt, prefill, steer, settings)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.store: dict[str, str] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by an interruption
                    continue
                self.store[row["key"]] = row["response"]

    def add(self, items: dict[str, str]) -> None:
        self.store.update(items)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for k, v in items.items():
                    f.write(json.dumps({"key": k, "response": v}, ensure_ascii=False) + "\n")


class Evaluator:
    """Runs one policy through an EvalConfig and returns its results record."""

    def __init__(self, model, chat: ChatFormat, cfg: EvalConfig, *, name: str,
                 adapter: str | None = None, input_filter=None, dirs=None,
                 plane_layer: int | None = None, latent_threshold: float | None = None,
                 cache: GenerationCache | None = None,
                 progress: Callable[[str, int], Callable[[int], None]] | None = None):
        self.model, self.chat, self.cfg = model, chat, cfg
        self.name, self.adapter, self.filter = name, adapter, input_filter
        self.dirs, self.plane_layer = dirs, plane_layer
        self.latent_threshold = latent_threshold
        self.cache = cache or GenerationCache(None)
        self.progress = progress or (lambda desc, total: (lambda n=1: None))
        ident = model_identity(model)
        plain = {"model": ident, "adapter": adapter_fingerprint(adapter),
                 "template": chat.template_hash(), "max_new_tokens": cfg.max_new_tokens}
        # A layer that only blocks prompts changes no generation: its key is None, so the plain
        # model's cached generations serve it.
        self.plain_key = sha256_json({**plain, "filter": None})[:16]
        self.policy_key = sha256_json({**plain, "filter": input_filter.generation_key()
                                       if input_filter is not None else None})[:16]
        self.judge = get_judge(cfg.judge)

    # generation --------------------------------------------------------------------------------
    def respond(self, prompts: Sequence[str], prefills: Sequence[str | None] | None = None,
                steer: str | None = None, desc: str = "generating") -> list[str]:
        """Responses of this policy, from the cache where present; filtered prompts are blocked."""
        prefills = list(prefills) if prefills is not None else [None] * len(prompts)
        blocked = self.filter.flags(list(prompts)) if self.filter else [False] * len(prompts)
        keys = [sha256_json([self.policy_key, p, f, steer]) for p, f in zip(prompts, prefills)]
        todo = [i for i, k in enumerate(keys) if not blocked[i] and k not in self.cache.store]
        if todo:
            self._generate_into_cache([(keys[i], prompts[i], prefills[i]) for i in todo],
                                      self._steer(steer), desc)
        return [BLOCKED if b else self.cache.store[k] for k, b in zip(keys, blocked)]

    def _generate_into_cache(self, items: list[tuple[str, str, str | None]], steer: Steer | None,
                             desc: str) -> None:
        """Generate (key, prompt, prefill) items in one call, appending rows to the cache as they
        finish, so that an interrupted evaluation resumes without regenerating them
        (`DataParallelEvaluator` shares the items out to ranks instead)."""
        advance = self.progress(desc, len(items))

        def done(rows: list[int], texts: list[str]) -> None:
            self.cache.add({items[r][0]: t for r, t in zip(rows, texts)})
            advance(len(rows))

        prompts, prefills = [p for _, p, _ in items], [f for _, _, f in items]
        if self.filter is not None and self.filter.generation_key() is not None:
            # A layer that wraps generation sees the whole set at once; rows land together.
            done(list(range(len(items))), self.filter.respond(self.generate_text, prompts,
                                                              prefills, steer))
            return
        # One call for the whole set: the decoder orders it by length and refills slots.
        generate(self.model, self.chat, prompts, prefills=prefills, steer=steer,
                 max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.batch_size,
                 on_done=done)

    def generate_text(self, prompts: list[str], prefills: list[str | None] | None = None,
                      steer: Steer | None = None, *, chat: ChatFormat | None = None,
                      add: Steer | None = None, monitor=None) -> list[str]:
        """Greedy generation of the policy's model: what policy layers wrap (`Generate` in
        `harc.eval.filters.base`). `add` is applied together with `steer`."""
        if steer is None:
            steer, add = add, None
        kw = dict(prefills=prefills, steer=steer, max_new_tokens=self.cfg.max_new_tokens,
                  batch_size=self.cfg.batch_size)
        with steering(self.model, add):
            return generate(self.model, chat or self.chat, prompts, monitor=monitor, **kw)

    def _steer(self, steer: str | None) -> Steer | None:
        if steer is None:
            return None
        if steer != "ablate_refusal":
            raise HarcError(f"unknown steering edit {steer!r}")
        if self.dirs is None:
            raise HarcError("the ablation attack needs directions; run `harc extract` first")
        return Steer("ablate", self.dirs.v_ref)

    def _target(self, probes) -> list[str]:
        return self.respond([p.prompt for p in probes], [p.prefill for p in probes],
                            probes[0].steer if probes else None, desc="attack target")

    # pieces --------------------------------------------------------------------------------------
    def run_attack(self, spec, requests: list[dict]) -> tuple[str, dict, list]:
        name, params = (spec, {}) if isinstance(spec, str) else (
            spec["name"], {k: v for k, v in spec.items() if k != "name"})
        if isinstance(params.get("attacker"), str):
            params["attacker"] = self._local_attacker(params["attacker"])
        attack = get_attack(name, **params)
        if getattr(attack, "iterative", False):
            probes = attack.run(requests, self._target, self.judge)
        else:
            probes = attack.apply(requests)
        by_steer = defaultdict(list)
        for i, p in enumerate(probes):
            by_steer[p.steer].append(i)
        responses = [""] * len(probes)
        for steer, idx in by_steer.items():
            outs = self.respond([probes[i].prompt for i in idx], [probes[i].prefill for i in idx],
                                steer, desc=f"{self.name}: {name}")
            for i, o in zip(idx, outs):
                responses[i] = o
        verdicts = self.judge.judge([p.source_prompt for p in probes], responses)
        success = [(v.harmful if v.harmful is not None else not v.refused) and r != BLOCKED
                   for v, r in zip(verdicts, responses)]
        index = {r["prompt"]: i for i, r in enumerate(requests)}
        cats = defaultdict(list)
        for p, s in zip(probes, success):
            cats[p.category or "uncategorised"].append(s)
        stats = rate(success)
        rec = {"n": stats["n"], "success": stats["k"], "asr": stats["rate"], "ci": stats["ci"],
               "judge": self.judge.name, "params": attack.params(),
               "per_category": {c: {"n": len(v), "success": sum(v), "asr": sum(v) / len(v),
                                    "ci": wilson(sum(v), len(v))} for c, v in sorted(cats.items())},
               # Per probe, for intervals that resample requests (one request, many probes).
               "outcomes": [int(x) for x in success],
               "request_index": [index.get(p.source_prompt, -1) for p in probes]}
        latent = self.latent_verdicts(probes, responses)
        if latent is not None:
            harmful = rate([v.harmful for v in latent])
            primary = [type(v)(v.refused, not v.refused if v.harmful is None else v.harmful,
                               v.score, v.judge) for v in verdicts]
            table = defaultdict(int)  # (primary says harmful, latent says harmful) -> count
            for a, b in zip(primary, latent):
                table[f"{int(a.harmful)}{int(b.harmful)}"] += 1
            rec["latent"] = {"harmful_rate": harmful["rate"], "ci": harmful["ci"],
                             "threshold": self.latent_threshold, "layer": self.plane_layer,
                             "agreement": agreement(primary, latent, field="harmful"),
                             "table": dict(table)}
        return name, rec, probes

    def _local_attacker(self, spec: str) -> Callable[[list[str]], list[str]]:
        """A local attacker model for PAIR / PAP: "self" (the evaluated model, with any adapter
        disabled) or any model spec `load_model` takes; greedy, 256 new tokens."""
        if spec == "self":
            model, chat = self.model, self.chat
            disable = getattr(model, "disable_adapter", None)
        else:
            model, tok = load_model(spec)
            chat, disable = ChatFormat(tok, max_prompt_tokens=self.cfg.max_prompt_tokens), None

        def attacker(prompts: list[str]) -> list[str]:
            with disable() if disable else nullcontext():
                return generate(model, chat, prompts, max_new_tokens=256,
                                batch_size=self.cfg.batch_size)
        return attacker

    def latent_verdicts(self, probes, responses: list[str]):
        """The latent judge: the model's own response-side harmfulness reading (cos with
        v_harm_resp over the first response tokens at the plane layer) against a threshold."""
        if (not self.cfg.latent_judge or self.dirs is None or self.plane_layer is None
                or self.latent_threshold is None):
            return None
        keep = [i for i, r in enumerate(responses) if r.strip() and r != BLOCKED]
        scores = [float("-inf")] * len(responses)  # blocked or empty: nothing harmful said
        if keep:
            proj = response_projections(self.model, self.chat,
                                        [(probes[i].prompt, responses[i]) for i in keep],
                                        self.dirs, [self.plane_layer],
                                        batch_size=self.cfg.batch_size)
            for i, x in zip(keep, proj[:, 0, 0].tolist()):
                scores[i] = x
        judge = get_judge("latent", threshold=self.latent_threshold)
        return judge.judge([p.source_prompt for p in probes], responses, scores=scores)

    def refusal_rate(self, prompts: list[str], desc: str) -> dict:
        responses = self.respond(prompts, desc=desc)
        verdicts = self.judge.judge(prompts, responses)
        r = rate([v.refused or o == BLOCKED for v, o in zip(verdicts, responses)])
        return {"n": r["n"], "refused": r["k"], "rate": r["rate"], "ci": r["ci"]}

    def capability(self, items: list[dict]) -> dict:
        responses = self.respond([it["prompt"] for it in items], desc=f"{self.name}: capability")
        r = rate([check_capability(it, o) for it, o in zip(items, responses)])
        return {"n": r["n"], "correct": r["k"], "acc": r["rate"], "ci": r["ci"]}

    @torch.no_grad()
    def kl_and_ppl(self, prompts: list[str]) -> dict:
        """Token-mean KL(base || adapted) and perplexities on the base model's own benign answers."""
        disable = getattr(self.model, "disable_adapter", None)
        if disable is None:
            return {}
        with disable():
            answers = self.respond_base(prompts)
        tok = self.chat.tokenizer
        dev = next(self.model.parameters()).device
        kl_sum = nll_a = nll_b = 0.0
        count = 0
        bs = self.cfg.batch_size
        for s in range(0, len(prompts), bs):
            encs = [self.chat.encode_pair(p, a) for p, a in zip(prompts[s:s + bs], answers[s:s + bs])]
            ids, mask, pos = left_pad([e.ids for e in encs], tok.pad_token_id, dev)
            width = ids.shape[1]
            sel = torch.zeros_like(ids, dtype=torch.bool)
            for i, e in enumerate(encs):  # positions whose next token is a response token
                start = width - len(e.ids) + e.resp_start
                sel[i, start - 1: start - 1 + e.resp_len] = True
            target = ids[:, 1:][sel[:, :-1]]
            logp_a = F.log_softmax(self.model(input_ids=ids, attention_mask=mask,
                                              position_ids=pos).logits[sel].float(), -1)
            with disable():
                logp_b = F.log_softmax(self.model(input_ids=ids, attention_mask=mask,
                                                  position_ids=pos).logits[sel].float(), -1)
            kl_sum += F.kl_div(logp_a, logp_b, log_target=True, reduction="sum").item()
            nll_a -= logp_a.gather(1, target[:, None]).sum().item()
            nll_b -= logp_b.gather(1, target[:, None]).sum().item()
            count += target.numel()
        count = max(count, 1)
        return {"kl_vs_base": kl_sum / count, "ppl": float(torch.tensor(nll_a / count).exp()),
                "ppl_base": float(torch.tensor(nll_b / count).exp())}

    def respond_base(self, prompts: list[str]) -> list[str]:
        """The model's own answers (whatever the policy layer), under a key of their own."""
        key, layer = self.policy_key, self.filter
        self.policy_key, self.filter = sha256_json([self.plain_key, "base"])[:16], None
        try:
            return self.respond(prompts, desc=f"{self.name}: base answers")
        finally:
            self.policy_key, self.filter = key, layer

    def plane(self, probes_by_attack: dict[str, list]) -> dict | None:
        if self.dirs is None or self.plane_layer is None:
            return None
        pts = {}
        for name, probes in probes_by_attack.items():
            plain = [p for p in probes if p.prefill is None and p.steer is None]
            if plain:
                proj = prompt_projections(self.model, self.chat, [p.prompt for p in plain],
                                          self.dirs, [self.plane_layer], self.cfg.batch_size)
                pts[name] = proj[:, 0].tolist()
        return {"layer": self.plane_layer, "points": pts}

    # the whole run -------------------------------------------------------------------------------
    def run(self, data: dict) -> dict:
        """`data`: {"harmful": [records], "over_refusal": {name: [prompts]}, "benign": [prompts],
        "capability": [items]} as loaded by `load_eval_data`."""
        t0 = time.time()
        attacks, probes_by_attack, examples = {}, {}, []
        for spec in self.cfg.attacks:
            name, rec, probes = self.run_attack(spec, data["harmful"])
            attacks[name] = rec
            probes_by_attack[name] = probes
        mean_names = self.cfg.mean_attacks or [a for a in attacks if a != "direct"] or list(attacks)
        missing = [a for a in mean_names if a not in attacks]
        if missing:
            raise HarcError(f"eval.mean_attacks names attacks that were not run: {missing}")
        for name, probes in probes_by_attack.items():
            responses = self.respond([p.prompt for p in probes[:2]], [p.prefill for p in probes[:2]],
                                     probes[0].steer if probes else None)
            verdicts = self.judge.judge([p.source_prompt for p in probes[:2]], responses)
            for p, r, v in zip(probes[:2], responses, verdicts):
                examples.append({"attack": name, "prompt": p.prompt, "response": r,
                                 "judge": v.judge, "refused": v.refused, "harmful": v.harmful,
                                 "rationale": v.rationale})
        run = {
            "name": self.name, "model": model_identity(self.model)["model"],
            "adapter": self.adapter, "filter": getattr(self.filter, "name", None),
            "plugins": {"judge": {"name": self.judge.name, "params": self.judge.params()}},
            **({"layer": self.filter.record()} if self.filter is not None else {}),
            "attacks": attacks,
            "mean_asr": sum(attacks[a]["asr"] for a in mean_names) / len(mean_names),
            "mean_asr_attacks": mean_names,
            "over_refusal": {n: self.refusal_rate(p, f"{self.name}: {n}")
                             for n, p in data["over_refusal"].items()},
            "benign_refusal": self.refusal_rate(data["benign"], f"{self.name}: benign"),
            "examples": examples,
        }
        cap = {}
        if data.get("capability"):
            cap["items"] = self.capability(data["capability"])
        cap.update(self.kl_and_ppl(data["benign"]))
        if self.cfg.lm_eval_tasks:
            cap["lm_eval"] = lm_eval_scores(self.model, self.chat.tokenizer, self.cfg.lm_eval_tasks,
                                            limit=self.cfg.lm_eval_limit,
                                            batch_size=self.cfg.batch_size)
        if cap:
            run["capability"] = cap
        if self.cfg.plane:
            plane = self.plane(probes_by_attack)
            if plane:
                run["plane"] = plane
        run["wall_s"] = time.time() - t0
        return run


def adapter_fingerprint(adapter: str | None) -> str | None:
    """sha256 of an adapter's weights: what caches of its generations are keyed on."""
    if not adapter:
        return None
    files = sorted(Path(adapter).glob("adapter_model*.safetensors"))
    return sha256_file(files[0]) if files else adapter


class DataParallelEvaluator(Evaluator):
    """An Evaluator whose generations are shared out over the ranks.

    Every rank runs the same evaluation (the same calls in the same order, as collectives need);
    each uncached request set is dealt out to the ranks in blocks of one batch, and the outputs
    are gathered into every rank's cache in input order. Only rank 0 appends them to the cache
    file and reports progress."""

    def __init__(self, *args, world: World, **kwargs):
        if not world.is_main:
            kwargs["progress"] = None
        super().__init__(*args, **kwargs)
        self.world = world

    def _generate_into_cache(self, items: list[tuple[str, str, str | None]], steer: Steer | None,
                             desc: str) -> None:
        advance = self.progress(desc, len(items))
        bs = self.cfg.batch_size
        mine = self.world.shard(items, bs)
        outs = generate(self.model, self.chat, [p for _, p, _ in mine],
                        prefills=[f for _, _, f in mine], steer=steer,
                        max_new_tokens=self.cfg.max_new_tokens, batch_size=bs) if mine else []
        done = {k: o for (k, _, _), o in zip(items, self.world.gather(outs, bs), strict=True)}
        if self.world.is_main:
            self.cache.add(done)
        else:
            self.cache.store.update(done)
        advance(len(done))
