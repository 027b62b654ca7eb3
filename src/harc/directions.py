"""The four HARC directions per slot (HARC-METHOD §2): extraction, bootstrap, save and load."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from harc._version import __version__
from harc.activations import (
    MeanAccumulator,
    accumulate_sharded,
    fsdp_sharded,
    iter_encoded_acts,
    iter_prompt_acts,
    iter_response_acts,
    rank_share,
)
from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.io import atomic_write, sha256_json
from harc.models import check_identity, model_identity

NAMES = ("v_harm", "v_ref", "v_harm_resp", "v_ref_resp")


@dataclass
class Directions:
    """Unit directions [S, d] for S = n_layers + 1 slots, their raw norms and provenance."""

    v_harm: Tensor
    v_ref: Tensor
    v_harm_resp: Tensor
    v_ref_resp: Tensor
    norms: dict[str, Tensor]
    boot_cos: Tensor | None = None  # [K, S] cos(v_ref, v_harm) per bootstrap resample
    meta: dict = field(default_factory=dict)

    @property
    def n_slots(self) -> int:
        return self.v_harm.shape[0]

    def as_dict(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in NAMES}

    def cos(self, a: str, b: str) -> Tensor:
        """Per-slot cosine between two of the four directions."""
        return (getattr(self, a) * getattr(self, b)).sum(-1)

    def bootstrap_interval(self, level: float = 0.95) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and central `level` interval of cos(v_ref, v_harm) per slot across resamples."""
        if self.boot_cos is None:
            c = self.cos("v_ref", "v_harm")
            return c, c, c
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2])
        lo, hi = torch.quantile(self.boot_cos, q, dim=0)
        return self.boot_cos.mean(0), lo, hi

    def blend(self, fresh: Directions, beta: float) -> Directions:
        """normalize((1-beta)*self + beta*fresh) per direction; self stays the base (§5)."""
        mixed = {n: F.normalize((1 - beta) * getattr(self, n) + beta * getattr(fresh, n), dim=-1)
                 for n in NAMES}
        return Directions(**mixed, norms=fresh.norms, meta={**self.meta, "blend_beta": beta})

    def to(self, device, dtype=torch.float32) -> Directions:
        moved = {n: getattr(self, n).to(device, dtype) for n in NAMES}
        return Directions(**moved, norms=self.norms, boot_cos=self.boot_cos, meta=self.meta)

    def save(self, path: str | Path) -> Path:
        tensors = {n: getattr(self, n).contiguous().float().cpu() for n in NAMES}
        tensors.update({f"norm.{k}": v.float().cpu() for k, v in self.norms.items()})
        if self.boot_cos is not None:
            tensors["boot_cos"] = self.boot_cos.float().cpu()
        meta = {"harc": json.dumps(self.meta, default=str)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, model=None) -> Directions:
        path = Path(path)
        meta = read_meta(path)
        try:
            t = load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise HarcError(f"{path} is not a harc directions file: {e}") from e
        missing = [n for n in NAMES if n not in t]
        if missing:
            raise HarcError(f"{path} lacks {missing}; it is not a harc directions file")
        d = cls(**{n: t[n] for n in NAMES},
                norms={k[5:]: v for k, v in t.items() if k.startswith("norm.")},
                boot_cos=t.get("boot_cos"), meta=meta)
        if model is not None:
            d.check_fits(model)
        return d

    def check_fits(self, model) -> None:
        """Refuse directions of another model: another shape, or (same shape) other weights."""
        ident = model_identity(model)
        want = (ident["n_layers"] + 1, ident["hidden_size"])
        got = tuple(self.v_harm.shape)
        if got != want:
            raise HarcError(
                f"directions {got} come from another model ({self.meta.get('model')}); this model "
                f"needs {want}: re-run `harc extract` on {ident['model']}"
            )
        check_identity(self.meta, ident, "the directions", f"re-run `harc extract` on {ident['model']}")


def read_meta(path: str | Path) -> dict:
    """The provenance of a directions file (the model identity it was extracted from, ...),
    read from the header alone: checks can run before any model is loaded."""
    path = Path(path)
    if not path.is_file():
        raise HarcError(f"directions file not found: {path}; run `harc extract` first")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("harc", "{}"))
            names = set(f.keys())
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise HarcError(f"{path} is not a harc directions file "
                        f"({str(e).splitlines()[0][:100]})") from None
    if not set(NAMES) <= names or not isinstance(meta, dict):
        raise HarcError(f"{path} is not a harc directions file (it lacks the four directions)")
    return meta


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = x.norm(dim=-1)
    return x / norm.clamp(min=1e-12).unsqueeze(-1), norm


def _nonempty(name: str, items: Sequence) -> None:
    if not items:
        raise HarcError(f"the {name} set is empty; give at least one example")


def _accumulate(acts, items: Sequence, acc: MeanAccumulator, batch_size: int, world=None,
                even: bool = False) -> MeanAccumulator:
    """Feed `acc` the batches of `acts(items)`, or this rank's share of them (harc.distributed)."""
    if world is not None and world.size > 1:
        return accumulate_sharded(world, acts, items, acc, batch_size, even)
    for views in acts(items):
        acc.add(views)
    return acc


def extract_directions(
    model, chat: ChatFormat, *, harmful: Sequence[str], harmless: Sequence[str],
    harmful_completions: Sequence[tuple[str, str]], refusals: Sequence[tuple[str, str]],
    helpful: Sequence[tuple[str, str]], n_resp_tokens: int = 32, batch_size: int = 16,
    n_boot: int = 100, seed: int = 0, progress: Callable[[int], None] | None = None,
    provenance: dict | None = None, world=None,
) -> Directions:
    """Difference-of-means directions at t_inst, t_post and over the response window.

    harmful/harmless: prompts. harmful_completions, refusals: (harmful prompt, text) pairs;
    helpful: (harmless prompt, answer) pairs. `progress(n)` is called after each batch.
    world: a multi-process `harc.distributed.World`: each rank runs its share of the batches and
    the sums are all-reduced; every rank returns the single-process directions and bootstrap.
    """
    for name, items in [("harmful", harmful), ("harmless", harmless),
                        ("harmful-completion", harmful_completions), ("refusal", refusals),
                        ("helpful", helpful)]:
        _nonempty(name, items)
    kw = dict(batch_size=batch_size, progress=progress)
    even = world is not None and world.size > 1 and fsdp_sharded(model)
    prompt_acc = {}
    for i, (name, prompts) in enumerate([("harmful", harmful), ("harmless", harmless)]):
        prompt_acc[name] = _accumulate(
            lambda items: iter_prompt_acts(model, chat, items, **kw), prompts,
            MeanAccumulator(n_boot, seed + i), batch_size, world, even)
    resp_mean = {}
    for name, pairs in [("completion", harmful_completions), ("refusal", refusals),
                        ("helpful", helpful)]:
        acc = _accumulate(
            lambda items: ({"resp": x} for x in iter_response_acts(
                model, chat, items, n_tokens=n_resp_tokens, **kw)),
            pairs, MeanAccumulator(), batch_size, world, even)
        resp_mean[name] = acc.mean("resp")

    h, b = prompt_acc["harmful"], prompt_acc["harmless"]
    v_harm, n_harm = _unit(h.mean("inst") - b.mean("inst"))
    v_ref, n_ref = _unit(h.mean("post") - b.mean("post"))
    v_harm_resp, n_harm_resp = _unit(resp_mean["completion"] - resp_mean["helpful"])
    v_ref_resp, n_ref_resp = _unit(resp_mean["refusal"] - resp_mean["helpful"])
    boot = None
    if n_boot:
        bh = F.normalize(h.boot_means("inst") - b.boot_means("inst"), dim=-1)
        br = F.normalize(h.boot_means("post") - b.boot_means("post"), dim=-1)
        boot = (bh * br).sum(-1)
    meta = {
        **model_identity(model),
        "chat_template": chat.template_hash(),
        "raw_template": chat.raw_template,
        "system_prompt": chat.system_prompt,
        "positions": {"t_inst": chat.t_inst, "t_post": chat.t_post, "n_resp_tokens": n_resp_tokens},
        "sizes": {"harmful": len(harmful), "harmless": len(harmless),
                  "harmful_completions": len(harmful_completions), "refusals": len(refusals),
                  "helpful": len(helpful)},
        "content_sha256": {
            "harmful": sha256_json(list(harmful)), "harmless": sha256_json(list(harmless)),
            "harmful_completions": sha256_json([list(p) for p in harmful_completions]),
            "refusals": sha256_json([list(p) for p in refusals]),
            "helpful": sha256_json([list(p) for p in helpful]),
        },
        "n_boot": n_boot, "seed": seed, "harc_version": __version__, **(provenance or {}),
    }
    return Directions(v_harm, v_ref, v_harm_resp, v_ref_resp,
                      norms={"v_harm": n_harm, "v_ref": n_ref, "v_harm_resp": n_harm_resp,
                             "v_ref_resp": n_ref_resp},
                      boot_cos=boot, meta=meta)


@torch.no_grad()
def prompt_projections(model, chat: ChatFormat, prompts: Sequence[str], dirs: Directions,
                       slots: Sequence[int] | None = None, batch_size: int = 16,
                       world=None) -> Tensor:
    """[N, len(slots), 2]: cos(h(t_inst), v_harm) and cos(h(t_post), v_ref) per prompt and slot.
    world: a multi-process `harc.distributed.World`: each rank runs its share of the batches and
    every rank returns all rows, in input order."""
    slots = list(range(dirs.n_slots)) if slots is None else list(slots)
    v_harm, v_ref = dirs.v_harm[slots], dirs.v_ref[slots]
    sharded = world is not None and world.size > 1
    share, padded = (rank_share(world, prompts, batch_size, fsdp_sharded(model)) if sharded
                     else (prompts, 0))
    # Shortest first, batches bounded in padded tokens: jailbreak templates run from tens to
    # thousands of tokens, and one long row would pad its whole batch to its length.
    encoded = [chat.encode_prompt(p) for p in share]
    order = sorted(range(len(share)), key=lambda i: len(encoded[i]))
    out = []
    for views in iter_encoded_acts(model, chat, [encoded[i] for i in order], slots=slots,
                                   batch_size=batch_size, max_tokens=batch_size * 512):
        ph = F.cosine_similarity(views["inst"].cpu(), v_harm.unsqueeze(0), dim=-1)
        pr = F.cosine_similarity(views["post"].cpu(), v_ref.unsqueeze(0), dim=-1)
        out.append(torch.stack([ph, pr], dim=-1))
    rows = torch.empty(len(share), len(slots), 2)
    if out:
        rows[torch.tensor(order)] = torch.cat(out)
    if not sharded:
        return rows
    mine = rows[: len(share) - padded]
    return torch.stack(world.gather(list(mine), batch_size))


@torch.no_grad()
def response_projections(model, chat: ChatFormat, pairs: Sequence[tuple[str, str]],
                         dirs: Directions, slots: Sequence[int], n_tokens: int = 32,
                         batch_size: int = 16) -> Tensor:
    """[N, len(slots), 2]: cos of the response-window mean with v_harm_resp and v_ref_resp."""
    slots = list(slots)
    vh, vr = dirs.v_harm_resp[slots], dirs.v_ref_resp[slots]
    out = []
    for x in iter_response_acts(model, chat, pairs, n_tokens=n_tokens, slots=slots,
                                batch_size=batch_size):
        x = x.cpu()
        out.append(torch.stack([F.cosine_similarity(x, vh.unsqueeze(0), dim=-1),
                                F.cosine_similarity(x, vr.unsqueeze(0), dim=-1)], dim=-1))
    return torch.cat(out)
