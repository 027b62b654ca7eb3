"""GCG (Zou et al. 2023): a per-request adversarial suffix found by greedy coordinate gradient.

White-box and GPU-bound: it needs the target model's weights and gradients, so it runs through
`nanogcg` (not a harc dependency; `pip install nanogcg==0.3.0`) on CUDA. The default budget is
deliberately small (64 steps x 128 candidates, minutes per request on one GPU); the paper's 500
steps x 512 is a knob away. The optimisation target is the request's affirmative start.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from harc.errors import HarcError
from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack
from harc.eval.attacks.prefill import affirmative_target
from harc.models import load_model


@register_attack
class Gcg(Attack):
    name = "gcg"

    class Config(Attack.Config):
        model: Any = None  # the target model object, or a harc model spec to load
        tokenizer: Any = None
        num_steps: int = 64
        search_width: int = 128
        topk: int = 64
        seed: int = 0

    def apply(self, requests: list[dict]) -> list[Probe]:
        reqs = normalize_requests(requests)
        nanogcg = self._nanogcg()
        model, tok = self._model()
        c = self.config
        cfg = nanogcg.GCGConfig(num_steps=c.num_steps, search_width=c.search_width, topk=c.topk,
                                seed=c.seed, verbosity="WARNING")
        out = []
        for r in reqs:
            target = r.get("target") or affirmative_target(r["prompt"])
            res = nanogcg.run(model, tok, r["prompt"], target, cfg)  # suffix goes after the text
            out.append(self.probe(r, f"{r['prompt']} {res.best_string}",
                                  meta={"suffix": res.best_string, "loss": float(res.best_loss),
                                        "target": target}))
        return out

    @staticmethod
    def _nanogcg():
        try:
            nanogcg = importlib.import_module("nanogcg")
        except ImportError:
            raise HarcError("attack 'gcg' needs nanogcg: pip install nanogcg==0.3.0") from None
        if not torch.cuda.is_available():
            raise HarcError("attack 'gcg' needs a CUDA GPU (gradients through the whole model); "
                            "none is visible here")
        return nanogcg

    def _model(self):
        c = self.config
        if isinstance(c.model, str):
            return load_model(c.model, device="cuda")
        if c.model is None or c.tokenizer is None:
            raise HarcError("attack 'gcg' needs the target: options 'model' and 'tokenizer' "
                            "(objects), or 'model' as a model spec")
        return c.model, c.tokenizer
