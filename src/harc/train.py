"""The HARC trainer (HARC-METHOD §4-5): one config dataclass, one trainer, one CLI body.

Design, against the reference's defects (§6):
- One copy of the base weights: the KL reference comes from the same model under
  `peft_model.disable_adapter()` in no_grad, on the retain rows only.
- Logits only where a loss reads them: the decoder backbone gives final hidden states; the LM head
  runs on the response positions of harmful rows (CE) and retain rows (KL), in chunks that are
  recomputed in backward (see `harc.losses`), bf16 matmul with float32 softmax reductions.
- One forward of the adapted model per micro-batch serves both couplings, KL and CE: in a causal
  model the residuals at the prompt's t_inst / t_post inside (prompt + response) equal those of the
  prompt alone.
- Length-aware batching: each category's draw for a window of micro-batches is sorted by length
  and dealt out in order, so each micro-batch keeps its 6/4/2 composition with less padding.
- Data order is a pure function of (seed, micro-step), so resuming needs no sampler state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import random
import shutil
import tempfile
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from harc import __version__
from harc._config import coerce, type_name
from harc.activations import ResidualCapture, masked_mean
from harc.chat import ChatFormat, PairEncoding, left_pad
from harc.directions import NAMES, Directions, extract_directions, prompt_projections
from harc.errors import HarcError
from harc.io import atomic_write, atomic_write_json, atomic_write_text
from harc.layers import SCORES, select_layers
from harc.losses import head_kl_retain, head_refusal_ce, prompt_coupling, response_coupling
from harc.models import (
    DEFAULT_TARGET_MODULES,
    attach_lora,
    decoder_layers,
    fused_lora,
    model_identity,
    unwrap,
)

KINDS = ("harmful", "harmless", "pseudo")
DTYPES = ("auto", "bfloat16", "float16", "float32")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv")


# --------------------------------------------------------------------------------------- config

@dataclass
class LoraSettings:
    """LoRA adapter shape (§5: r 32, alpha 64, dropout 0 on all seven projections).

    r: rank. alpha: scaling numerator (scale = alpha / r). dropout: LoRA dropout probability.
    targets: names of the linear modules that get an adapter.
    """

    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))


@dataclass
class BatchSizes:
    """Rows per micro-batch from each category (§5: 6 harmful + 4 harmless + 2 pseudo).

    harmful: prompt + refusal rows (CE, coupling pushed up). harmless / pseudo: prompt + answer
    rows (KL retain, coupling pushed down); pseudo = harmless prompts that look harmful.
    """

    harmful: int = 6
    harmless: int = 4
    pseudo: int = 2


@dataclass
class LossWeights:
    """Weights of the total loss (§4): couple 1, couple_resp 1, kl 10, ce 1."""

    couple: float = 1.0
    couple_resp: float = 1.0
    kl: float = 10.0
    ce: float = 1.0


@dataclass
class DataSettings:
    """Where the data comes from: each entry is a registry name (resolved by `harc.data.load`) or a
    path to a data file (relative paths: from the working directory, else from the config's folder).

    harmful: records {"prompt", "refusal", "completion"?}; the refusal is the CE target.
    harmless: records {"prompt", "response"} (KL retain). pseudo: pseudo-harmful {"prompt",
    "response"} (KL retain); null for none. extract_harmful: triples {"prompt", "refusal",
    "completion"} for direction extraction (default: `harmful`). extract_harmless: pairs for
    extraction (default: `harmless`). These two may hold prompts only (e.g. AdvBench + Alpaca, the
    Qwen reference): then the response-side directions use the first `extract_n` training records.
    val_harmful / val_harmless: prompts for the held-out projection check (default: held out from
    the extraction sets, and removed from training).
    extract_n: examples per extraction set (§2: 300). val_n: held-out prompts per side (§2: 100).
    harmful_n / harmless_n / pseudo_n: use only the first N training records (null: all; §5 uses
    5,000 UltraChat pairs).
    """

    harmful: str | None = None
    harmless: str | None = None
    pseudo: str | None = None
    extract_harmful: str | None = None
    extract_harmless: str | None = None
    val_harmful: str | None = None
    val_harmless: str | None = None
    extract_n: int = 300
    val_n: int = 100
    harmful_n: int | None = None
    harmless_n: int | None = None
    pseudo_n: int | None = None


@dataclass
class HarcConfig:
    """Every setting of a HARC training run. YAML keys are these field names (nested with dots).

    model: built-in name, local folder, .gguf file or hub id (see `harc.models.load_model`).
    dtype: "auto" (bf16 on GPU, float32 on CPU), "bfloat16", "float16" or "float32".
    attn_implementation: transformers attention kernel; "sdpa" by default.
    raw_template: null (the tokenizer's chat template), "qwen", "llama" or a string with "{}"
        (§1 raw-template variant, used for Qwen in the released configs).
    system_prompt: system message rendered before the user turn (chat template only).
    directions: optional `harc extract` output used as the base directions; null extracts them
        at the start from `data.extract_*`.
    data: see `DataSettings`. lora: see `LoraSettings`. batch: see `BatchSizes`.
    weights: see `LossWeights`.
    lr: AdamW learning rate (§5: 1e-4). weight_decay: AdamW weight decay (0).
    warmup_steps: linear warm-up from 0 to `lr` over this many optimizer steps, then constant.
    steps: optimizer steps to train (§5: 400 Llama, 2000 Qwen).
    grad_accum: micro-batches per optimizer step (§5: 2, effective batch 24).
    max_grad_norm: clip the gradient norm to this; null: no clipping (the norm is still checked).
    skip_nonfinite: optimizer steps with a non-finite loss or gradient norm that are dropped (update
        not applied, logged) before the run stops at its last good checkpoint; 0: stop at the first.
    margin: hinge margin m of the coupling losses, 0 < m <= 1 (released 0.5; reference code 0.3).
    max_prompt_tokens / max_response_tokens: truncation (prompt from the left, response right).
    n_resp_tokens: response window of the response coupling (§1: 32 tokens).
    refresh_every: re-extract and blend the directions every this many steps (0: never).
    beta: blend weight of the fresh directions: normalize((1-beta) v_base + beta v_fresh).
    n_boot: bootstrap resamples of cos(v_ref, v_harm) at each extraction (0: none).
    extract_batch_size: batch size of extraction and of the held-out check.
    k_start / k_final / ramp_step: K selected layers before / from optimizer step `ramp_step`.
    layer_score: "variant_d" (reference code) or "legacy" (hyper-parameter notes).
    band: [low, high_offset]: only slots low <= l <= n_layers - high_offset are eligible.
    layers: fixed slot list; disables selection and the K ramp. null: select.
    seed: seeds Python, torch, the LoRA init and the data order.
    checkpoint_every: write a resumable checkpoint every this many steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    output_dir: run folder (adapter/, checkpoints/, log.jsonl, directions, config.yaml).
    resume: "auto" (continue from the latest checkpoint in output_dir if any), "never" (refuse a
        folder that has checkpoints) or the path of a checkpoint folder.
    gradient_checkpointing: recompute block activations in backward (less memory, ~1/3 more time).
    compile: run the decoder blocks through torch.compile while training (GPU: a one-time compile
        of a minute or two, then about 15% faster steps at 7B scale; see docs/performance.md).
    logits_chunk: response positions per LM-head chunk in KL and CE.
    bucket_window: micro-batches whose draws are sorted by length together (0: grad_accum).
    pad_multiple: pad each micro-batch's width to a multiple of this (fewer distinct shapes).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    raw_template: str | None = None
    system_prompt: str | None = None
    directions: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    steps: int = 400
    batch: BatchSizes = field(default_factory=BatchSizes)
    grad_accum: int = 2
    max_grad_norm: float | None = None
    skip_nonfinite: int = 3
    margin: float = 0.5
    weights: LossWeights = field(default_factory=LossWeights)
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    n_resp_tokens: int = 32
    refresh_every: int = 200
    beta: float = 0.3
    n_boot: int = 100
    extract_batch_size: int = 16
    k_start: int = 2
    k_final: int = 4
    ramp_step: int = 1000
    layer_score: str = "variant_d"
    band: tuple[int, int] = (4, 4)
    layers: list[int] | None = None
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    output_dir: str = "runs/harc"
    resume: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    logits_chunk: int = 1024
    bucket_window: int = 0
    pad_multiple: int = 8

    def validate(self, require_data: bool = True) -> HarcConfig:
        """Raise HarcError naming the first invalid key; return self."""
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise HarcError(f"config key {key!r}: {why} (got {_get(self, key)!r})")

        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.steps > 0, "steps", "must be a positive number of optimizer steps")
        need(self.lr > 0, "lr", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             "must be positive or null")
        need(self.skip_nonfinite >= 0, "skip_nonfinite", "must be >= 0")
        need(0 < self.margin <= 1, "margin", "must satisfy 0 < margin <= 1")
        for k in KINDS:
            need(getattr(self.batch, k) >= 0, f"batch.{k}", "must be >= 0")
        need(self.batch.harmful + self.batch.harmless + self.batch.pseudo > 0, "batch.harmful",
             "a micro-batch needs at least one row")
        for k in ("couple", "couple_resp", "kl", "ce"):
            w = getattr(self.weights, k)
            need(w >= 0 and math.isfinite(w), f"weights.{k}", "must be a finite number >= 0")
        need(self.max_prompt_tokens > 0, "max_prompt_tokens", "must be positive")
        need(self.max_response_tokens > 1, "max_response_tokens", "must be > 1 (EOS included)")
        need(self.n_resp_tokens > 0, "n_resp_tokens", "must be positive")
        need(self.refresh_every >= 0, "refresh_every", "must be >= 0 (0: never)")
        need(0 <= self.beta <= 1, "beta", "must lie in [0, 1]")
        need(self.n_boot >= 0, "n_boot", "must be >= 0")
        need(self.extract_batch_size > 0, "extract_batch_size", "must be positive")
        need(self.k_start >= 1, "k_start", "must be >= 1")
        need(self.k_final >= 1, "k_final", "must be >= 1")
        need(self.ramp_step >= 0, "ramp_step", "must be >= 0")
        need(self.layer_score in SCORES, "layer_score", f"must be one of {SCORES}")
        need(len(self.band) == 2 and min(self.band) >= 0, "band", "must be [low, high_offset] >= 0")
        need(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0), "layers",
             "must be null or a non-empty list of slot indices")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.logits_chunk > 0, "logits_chunk", "must be positive")
        need(self.bucket_window >= 0, "bucket_window", "must be >= 0")
        need(self.pad_multiple >= 1, "pad_multiple", "must be >= 1")
        need(self.lora.r > 0, "lora.r", "must be positive")
        need(self.lora.alpha > 0, "lora.alpha", "must be positive")
        need(0 <= self.lora.dropout < 1, "lora.dropout", "must lie in [0, 1)")
        need(len(self.lora.targets) > 0, "lora.targets", "must name at least one module")
        need(self.data.extract_n > 0, "data.extract_n", "must be positive")
        need(self.data.val_n >= 0, "data.val_n", "must be >= 0")
        for k in KINDS:
            n = getattr(self.data, f"{k}_n")
            need(n is None or n > 0, f"data.{k}_n", "must be positive or null")
        if require_data:  # `harc run` synthesises what the config leaves out
            need(self.data.harmful is not None, "data.harmful",
                 "is required (harmful triples; `harc run` synthesises them from the model)")
            need(self.data.harmless is not None, "data.harmless", "is required (harmless pairs)")
            need(self.batch.pseudo == 0 or self.data.pseudo is not None, "data.pseudo",
                 "is required while batch.pseudo > 0 (or set batch.pseudo=0)")
        need(self.resume in ("auto", "never") or Path(self.resume).is_dir(), "resume",
             "must be 'auto', 'never' or an existing checkpoint folder")
        return self


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _coerce(key: str, value: Any, hint) -> Any:
    """Check `value` against a type hint (see `harc._config.coerce`); nested sections recurse."""
    if _is_dataclass_type(hint):
        if not isinstance(value, Mapping):
            raise HarcError(f"config key {key!r} must be a mapping of {_field_names(hint)}")
        return _build(hint, value, f"{key}.")
    ok, parsed = coerce(value, hint)
    if not ok:
        raise HarcError(f"config key {key!r} must be {type_name(hint)}, got {value!r}")
    return parsed


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _build(cls, raw: Mapping, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = _field_names(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; known: {names}"
            raise HarcError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def _apply_override(raw: dict, item: str) -> None:
    import yaml

    if "=" not in item:
        raise HarcError(f"override {item!r} must look like key=value (e.g. lr=2e-4, lora.r=16)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise HarcError(f"override {item!r}: {p!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = text


def _looks_like_path(s: str) -> bool:
    return s.lower().endswith(_DATA_SUFFIXES) or s.startswith(("/", "./", "../", "~"))


def _resolve_file(value: str, base: Path | None, key: str) -> str:
    """Absolute path of a data/directions file; a HarcError naming `key` if it does not exist."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([base / p] if base else [])
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    raise HarcError(f"config key {key!r}: file not found: {value}")


def _check_registered(name: str, key: str) -> None:
    try:
        from harc.data.registry import get
    except ImportError:
        return  # checked when the data is loaded
    try:
        get(name)
    except HarcError as e:
        raise HarcError(f"config key {key!r}: {e}") from e


def read_yaml_config(path: str | Path) -> tuple[dict, Path]:
    """A YAML config file as a mapping, and its folder (relative paths resolve against it)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HarcError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HarcError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise HarcError(f"{path} must hold a mapping of config keys")
    return raw, path.parent.resolve()


def load_config(yaml_path: str | Path | None, overrides: Sequence[str] = ()) -> HarcConfig:
    """Read a YAML config, apply `key=value` overrides (dots for nesting) and validate.

    Everything is checked before any model is loaded: unknown keys, types, ranges and data files.
    """
    raw, base = read_yaml_config(yaml_path) if yaml_path is not None else ({}, None)
    # A `harc run` config may be trained alone: its eval/run sections belong to the pipeline.
    raw.pop("eval", None)
    raw.pop("run", None)
    return config_from_raw(raw, base, overrides)


def config_from_raw(raw: dict, base: Path | None, overrides: Sequence[str] = (), *,
                    require_data: bool = True) -> HarcConfig:
    """Validate a config mapping (relative paths resolve against `base`, the config's folder)."""
    raw = dict(raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(HarcConfig, raw).validate(require_data)
    for name in _field_names(DataSettings):
        value = getattr(cfg.data, name)
        if not isinstance(value, str):
            continue
        if _looks_like_path(value) or Path(value).exists():
            setattr(cfg.data, name, _resolve_file(value, base, f"data.{name}"))
        else:
            _check_registered(value, f"data.{name}")
    if cfg.directions:
        cfg.directions = _resolve_file(cfg.directions, base, "directions")
    if cfg.model.endswith(".gguf") or cfg.model.startswith(("/", "./", "../", "~")):
        cfg.model = _resolve_file(cfg.model, base, "model")
    return cfg


def config_dict(cfg: HarcConfig) -> dict:
    """Plain (YAML/JSON-safe) dict of a config."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------- data

def load_records(spec: str, limit: int | None = None) -> list[dict]:
    """Records of one data entry: through `harc.data.load` (registry names and files) when that
    exists, else JSON / JSON-lines files directly. `limit` keeps the first N."""
    try:
        from harc.data import load  # the dataset registry
    except ImportError:
        load = None
    if load is not None:
        return list(load(spec, limit=limit))
    p = Path(spec)
    if not p.is_file():
        raise HarcError(f"{spec!r} is not a file and the dataset registry (harc.data.load) "
                        "is not installed; give a .jsonl/.json path")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            recs = list(data.values() if isinstance(data, dict) else data)
        else:
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        return recs[:limit] if limit is not None else recs
    except json.JSONDecodeError as e:
        raise HarcError(f"{p} is not valid JSON: {e}") from e


def load_data(cfg: HarcConfig) -> dict[str, list[dict]]:
    """Every data entry of the config, loaded (missing optional entries are left out)."""
    out = {}
    for name in ("harmful", "harmless", "pseudo", "extract_harmful", "extract_harmless",
                 "val_harmful", "val_harmless"):
        spec = getattr(cfg.data, name)
        if spec:
            recs = load_records(spec, getattr(cfg.data, f"{name}_n", None))
            if not recs:
                raise HarcError(f"data.{name} ({spec}) is empty")
            out[name] = recs
    return out


def _prompts(recs: Sequence) -> list[str]:
    return [r if isinstance(r, str) else r["prompt"] for r in recs]


def _check_fields(name: str, recs: Sequence, fields: tuple[str, ...]) -> None:
    for i, r in enumerate(recs):
        if not isinstance(r, Mapping):
            raise HarcError(f"data.{name}[{i}] must be a mapping with fields {fields}")
        missing = [f for f in fields if not isinstance(r.get(f), str) or not r[f].strip()]
        if missing:
            raise HarcError(f"data.{name}[{i}] lacks a non-empty {missing[0]!r} "
                            f"(needs {', '.join(fields)})")


def split_data(cfg: HarcConfig, data: Mapping[str, Sequence], *,
               need_extraction: bool = True) -> dict[str, list]:
    """Fill in extraction and validation sets and keep validation prompts out of training.

    Extraction prompts: the first `extract_n` of a seeded shuffle of `extract_*` (default: the
    training set); validation: the next `val_n` of it unless given, removed from training.
    Response-side extraction ("extract_*_resp"): the extraction records when they carry the
    texts, else the first `extract_n` shuffled training records that do.
    """
    for k in ("harmful", "harmless"):
        if not data.get(k):
            raise HarcError(f"data.{k} is empty; it is required")
    out = {k: list(v) for k, v in data.items() if v}
    rng = random.Random(cfg.seed)
    for side in ("harmful", "harmless"):
        src = f"extract_{side}"
        pool = list(out.get(src) or out[side])
        rng.shuffle(pool)
        n = min(cfg.data.extract_n, len(pool))
        out[src] = pool[:n]
        val_key = f"val_{side}"
        if val_key not in out and cfg.data.val_n:
            out[val_key] = _prompts(pool[n: n + cfg.data.val_n])
    held = set(_prompts(out.get("val_harmful", [])) + _prompts(out.get("val_harmless", [])))
    for k in KINDS:
        if k in out:
            kept = [r for r in out[k] if r.get("prompt") not in held]
            if not kept:
                raise HarcError(f"every data.{k} prompt is also a validation prompt")
            out[k] = kept
    _check_fields("harmful", out["harmful"], ("prompt", "refusal"))
    for k in ("harmless", "pseudo"):
        if k in out:
            _check_fields(k, out[k], ("prompt", "response"))
    for side, fields in (("harmful", ("refusal", "completion")), ("harmless", ("response",))):
        has = lambda r, fields=fields: all(isinstance(r.get(f), str) and r[f].strip()  # noqa: E731
                                           for f in fields)
        _check_fields(f"extract_{side}", out[f"extract_{side}"], ("prompt",))
        resp = [r for r in out[f"extract_{side}"] if has(r)]
        if len(resp) < len(out[f"extract_{side}"]):
            pool = [r for r in out[side] if has(r)]
            random.Random(cfg.seed + 1).shuffle(pool)
            resp = pool[: cfg.data.extract_n]
        if need_extraction and not resp:
            raise HarcError(f"no data.extract_{side} or data.{side} record has "
                            f"{' and '.join(fields)}: the response-side directions need them")
        out[f"extract_{side}_resp"] = resp
    return out


# ------------------------------------------------------------------------------------- batching

@dataclass(frozen=True)
class Example:
    """One encoded training row: `window` = response tokens pooled by the response coupling."""

    enc: PairEncoding
    kind: int  # index into KINDS
    window: int

    @property
    def length(self) -> int:
        return len(self.enc.ids)


def encode_example(chat: ChatFormat, rec: Mapping, kind: int, n_resp_tokens: int) -> Example:
    target = rec["refusal"] if kind == 0 else rec["response"]
    enc = chat.encode_pair(rec["prompt"], target, add_eos=True)
    has_eos = chat.tokenizer.eos_token_id is not None
    # The pooled window matches extraction, which encodes responses without the EOS.
    window = min(n_resp_tokens, max(enc.resp_len - int(has_eos), 1))
    return Example(enc, kind, window)


@dataclass
class MicroBatch:
    """A left-padded micro-batch with every index the losses need, built once on the CPU."""

    ids: Tensor
    mask: Tensor
    pos: Tensor
    is_harmful: Tensor  # [B] bool
    kind: Tensor  # [B] int
    inst_col: Tensor  # [B] column of t_inst
    post_col: Tensor  # [B] column of t_post
    window: Tensor  # [B, T] 1 on the pooled response tokens
    ce_rows: Tensor  # positions that predict harmful response tokens
    ce_cols: Tensor
    ce_targets: Tensor
    kl_rows: Tensor  # positions that predict retain response tokens
    kl_cols: Tensor
    retain_rows: Tensor  # rows of the base (KL reference) forward
    retain_trim: int  # leading columns that are padding in every retain row
    kl_sub_rows: Tensor  # kl_rows as indices into retain_rows
    n_real: int
    n_padded: int

    def to(self, device) -> MicroBatch:
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                 for f in dataclasses.fields(self)}
        return MicroBatch(**moved)


def collate(examples: Sequence[Example], tail_len: int, pad_id: int,
            multiple: int = 1) -> MicroBatch:
    """Left-pad `examples` (to a width that is a multiple of `multiple`) and index them."""
    ids, mask, pos = left_pad([e.enc.ids for e in examples], pad_id)
    extra = -ids.shape[1] % multiple
    if extra:  # fewer distinct shapes: GEMM heuristics and allocator blocks get reused
        ids = F.pad(ids, (extra, 0), value=pad_id)
        mask, pos = F.pad(mask, (extra, 0)), F.pad(pos, (extra, 0))
    B, T = ids.shape
    kind = torch.tensor([e.kind for e in examples], dtype=torch.long)
    offs = [T - e.length for e in examples]
    post = torch.tensor([o + e.enc.resp_start - 1 for o, e in zip(offs, examples, strict=True)])
    inst = torch.stack([(post - tail_len).clamp(min=0), torch.tensor(offs)]).max(0).values
    window = torch.zeros(B, T)
    ce, kl = ([], [], []), ([], [])
    for i, (o, e) in enumerate(zip(offs, examples, strict=True)):
        start = o + e.enc.resp_start
        window[i, start: start + e.window] = 1.0
        cols = list(range(start - 1, start + e.enc.resp_len - 1))
        if e.kind == 0:
            ce[0].extend([i] * len(cols))
            ce[1].extend(cols)
            ce[2].extend(e.enc.ids[e.enc.resp_start:])
        else:
            kl[0].extend([i] * len(cols))
            kl[1].extend(cols)
    retain = (kind != 0).nonzero().squeeze(1)
    trim = min((offs[i] for i in retain.tolist()), default=0) // multiple * multiple
    sub = {r: j for j, r in enumerate(retain.tolist())}
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return MicroBatch(
        ids=ids, mask=mask, pos=pos, is_harmful=kind == 0, kind=kind, inst_col=inst,
        post_col=post, window=window, ce_rows=t(ce[0]), ce_cols=t(ce[1]), ce_targets=t(ce[2]),
        kl_rows=t(kl[0]), kl_cols=t(kl[1]), retain_rows=retain, retain_trim=trim,
        kl_sub_rows=t([sub[r] for r in kl[0]]), n_real=int(mask.sum()), n_padded=B * T)


# ----------------------------------------------------------------------------------- step engine

def backbone(model):
    """The decoder stack without the LM head: its output is the final (normed) hidden state."""
    base = unwrap(model)
    body = getattr(base, "base_model", None)
    if body is None or body is base:
        raise HarcError(f"{type(base).__name__} has no separate decoder backbone and LM head")
    return body


def lm_head(model):
    """The LM head as a function of hidden states (with Gemma-2 style logit soft-capping)."""
    base = unwrap(model)
    head = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(h: Tensor) -> Tensor:
        return torch.tanh(head(h) / cap) * cap
    return capped


def _half_on_cuda(model) -> bool:
    dev = next(model.parameters()).device
    return dev.type == "cuda" and unwrap(model).dtype in (torch.bfloat16, torch.float16)


def _autocast(model):
    """bf16/fp16 models on CUDA run under autocast with PEFT's input casting off (see
    `_no_input_cast`): the LoRA weights stay float32 for the optimizer, their matmuls run in bf16."""
    if not _half_on_cuda(model):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=unwrap(model).dtype)


def _no_input_cast(model):
    """PEFT would copy each projection input to float32 for the float32 LoRA weights, and keep
    that copy for backward (about 60% more activation memory at 7B scale); autocast makes it
    unnecessary. Held across backward, so that checkpoint recomputation replays the same ops."""
    if not _half_on_cuda(model):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


TERMS = ("couple", "couple_resp", "kl", "ce")


def micro_step(model, mb: MicroBatch, dirs: Directions, layers: Sequence[int], *, margin: float,
               weights: Mapping[str, float] | None = None, backward_scale: float | None = None,
               chunk: int = 1024) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Forward (and, with `backward_scale`, backward) of one micro-batch on the model's device.

    Returns (terms, proj): terms has couple, couple_resp, kl, ce (0-d float32; with grad unless
    backward ran); proj holds [L, B] cosines "prompt_p_ref", "prompt_p_harm", "resp_p_ref",
    "resp_p_harm". The backward runs while the capture hooks are still registered: under
    transformers versions that checkpoint a block's `__call__`, the hooks are part of what the
    backward pass recomputes.
    """
    body, head = backbone(model), lm_head(model)
    h_base = None
    if mb.kl_rows.numel():
        # The KL reference: the same weights with the adapter off, on retain rows only.
        rr, trim = mb.retain_rows, mb.retain_trim
        with torch.no_grad(), model.disable_adapter(), _autocast(model):
            hb = body(input_ids=mb.ids[rr, trim:], attention_mask=mb.mask[rr, trim:],
                      position_ids=mb.pos[rr, trim:], use_cache=False).last_hidden_state
            h_base = hb[mb.kl_sub_rows, mb.kl_cols - trim]
            del hb
    rows = torch.arange(mb.ids.shape[0], device=mb.ids.device)

    def reduce(_slot: int, h: Tensor):
        with torch.autocast(h.device.type, enabled=False):  # float32 window mean
            return h[rows, mb.inst_col], h[rows, mb.post_col], masked_mean(h, mb.window)

    idx = list(layers)
    with ResidualCapture(model, idx, reduce=reduce, detach=False) as cap, _no_input_cast(model), \
            fused_lora(model):
        with _autocast(model):
            last = body(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos,
                        use_cache=False).last_hidden_state
        h_inst, h_post, h_resp = (torch.stack([cap.out[s][j] for s in idx]) for j in range(3))
        # Rows picked with Python ints and stacked: a list index would copy it to the GPU (a sync).
        v = {n: torch.stack([getattr(dirs, n)[s] for s in idx]) for n in NAMES}
        couple, pr, ph = prompt_coupling(h_inst, h_post, v["v_harm"], v["v_ref"], mb.is_harmful,
                                         margin)
        couple_resp, rpr, rph = response_coupling(h_resp, v["v_harm_resp"], v["v_ref_resp"],
                                                  mb.is_harmful, margin)
        ce = head_refusal_ce(head, last[mb.ce_rows, mb.ce_cols], mb.ce_targets, chunk)
        kl = (head_kl_retain(head, last[mb.kl_rows, mb.kl_cols], h_base, chunk)
              if h_base is not None else last.new_zeros((), dtype=torch.float32))
        terms = {"couple": couple, "couple_resp": couple_resp, "kl": kl, "ce": ce}
        if backward_scale is not None:
            w = weights or dataclasses.asdict(LossWeights())
            loss = sum(w[k] * terms[k] for k in TERMS) * backward_scale
            if loss.requires_grad:
                loss.backward()
            terms = {k: v.detach() for k, v in terms.items()}
    proj = {"prompt_p_ref": pr.detach(), "prompt_p_harm": ph.detach(),
            "resp_p_ref": rpr.detach(), "resp_p_harm": rph.detach()}
    return terms, proj


@contextlib.contextmanager
def compiled_blocks(model, on: bool = True):
    """Within the block, every decoder block's forward runs through torch.compile. The capture
    hooks stay outside the compiled region; the blocks share one code object, so a few graphs
    (with and without grad) serve them all, and dynamic shapes spare a recompile per batch width."""
    blocks = list(decoder_layers(model)) if on else []
    before = [vars(b).get("forward") for b in blocks]
    for b in blocks:
        b.forward = torch.compile(b.forward, dynamic=True)
    try:
        # A block that fails to compile runs eagerly (with a warning) instead of ending the run.
        with torch._dynamo.config.patch(suppress_errors=True) if on else contextlib.nullcontext():
            yield
    finally:
        for b, f in zip(blocks, before, strict=True):
            if f is None:
                del b.forward
            else:
                b.forward = f


# -------------------------------------------------------------------------------------- trainer

def set_checkpointing(model, on: bool) -> None:
    """Turn (non-reentrant) activation checkpointing of the decoder blocks on or off.

    Non-reentrant checkpointing runs the forward with autograd on, so the coupling hooks' captures
    stay in the graph; input embeddings are made to require grad, as PEFT needs for the reentrant
    variant, so that either kind works."""
    base = unwrap(model)
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.enable_input_require_grads()
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # all devices


def _rng_state() -> tuple[dict[str, Tensor], list]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors, list(random.getstate())


def _set_rng_state(tensors: dict[str, Tensor], py_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = py_state
    random.setstate((version, tuple(state), gauss))


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an existing one is swapped out, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RESUME_FREE = {"steps", "checkpoint_every", "keep_checkpoints", "resume", "output_dir",
                "gradient_checkpointing", "logits_chunk", "extract_batch_size", "attn_implementation",
                "pad_multiple", "skip_nonfinite"}


class HarcTrainer:
    """Trains a HARC LoRA adapter on `model` (a transformers causal LM, or a PeftModel).

    data: {"harmful": [{"prompt","refusal","completion"?}], "harmless": [{"prompt","response"}],
    "pseudo": [...]?, "extract_harmful"?, "extract_harmless"?, "val_harmful"?, "val_harmless"?}.
    directions: base directions; else `config.directions`, else extracted from the base model.
    """

    def __init__(self, config: HarcConfig, model, tokenizer, data: Mapping[str, Sequence], *,
                 directions: Directions | None = None, progress: bool = False):
        from peft import PeftModel

        self.cfg = cfg = config
        self.progress = progress
        self.out = Path(cfg.output_dir)
        seed_all(cfg.seed)
        self.chat = ChatFormat(tokenizer, system_prompt=cfg.system_prompt,
                               raw_template=cfg.raw_template,
                               max_prompt_tokens=cfg.max_prompt_tokens,
                               max_response_tokens=cfg.max_response_tokens)
        need_extraction = (directions is None and not cfg.directions) or cfg.refresh_every > 0
        self.data = split_data(cfg, data, need_extraction=need_extraction)
        for k in KINDS:
            if getattr(cfg.batch, k) and not self.data.get(k):
                raise HarcError(f"batch.{k}={getattr(cfg.batch, k)} but data.{k} is empty")
        self.examples = {k: [encode_example(self.chat, r, i, cfg.n_resp_tokens)
                             for r in self.data.get(k, [])] for i, k in enumerate(KINDS)}
        self.n_slots = len(decoder_layers(model)) + 1
        if cfg.layers is not None and max(cfg.layers) >= self.n_slots:
            raise HarcError(f"config key 'layers': slots must lie in 0..{self.n_slots - 1}")
        if directions is None and cfg.directions:
            directions = Directions.load(cfg.directions, model)
        if directions is None:
            with self._base_only(model):
                directions = self._extract(model)
        directions.check_fits(model)
        made_with = directions.meta.get("chat_template")
        if made_with and made_with != self.chat.template_hash():
            raise HarcError("the directions were extracted with another chat template, raw_template "
                            "or system prompt than this config's; re-extract or match them")
        self.device = next(model.parameters()).device
        self.base_dirs = directions.to("cpu")
        self.dirs = self.base_dirs
        self.layers = self._select(self.dirs, 0)
        if isinstance(model, PeftModel):
            self.model = model
        else:
            # Seeded just before the LoRA init, so the adapter starts the same in every run.
            torch.manual_seed(cfg.seed)
            self.model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                     dropout=cfg.lora.dropout, target_modules=cfg.lora.targets)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise HarcError("the model has no trainable (adapter) parameters")
        set_checkpointing(self.model, cfg.gradient_checkpointing)
        unwrap(self.model).config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self.skipped = 0  # non-finite optimizer steps dropped so far
        self._perms: dict[tuple[int, int], list[int]] = {}
        self._window: tuple[int, list[list[int]]] | None = None
        self._dev_dirs: tuple[Directions, Directions] | None = None

    # ---- directions and layers
    @staticmethod
    @contextlib.contextmanager
    def _base_only(model):
        ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with ctx:
            yield

    def _extract(self, model) -> Directions:
        d = self.data
        was_training = model.training
        model.eval()
        try:
            h_resp = d["extract_harmful_resp"]
            return extract_directions(
                model, self.chat, harmful=_prompts(d["extract_harmful"]),
                harmless=_prompts(d["extract_harmless"]),
                harmful_completions=[(r["prompt"], r["completion"]) for r in h_resp],
                refusals=[(r["prompt"], r["refusal"]) for r in h_resp],
                helpful=[(r["prompt"], r["response"]) for r in d["extract_harmless_resp"]],
                n_resp_tokens=self.cfg.n_resp_tokens, batch_size=self.cfg.extract_batch_size,
                n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        finally:
            model.train(was_training)

    def _k(self, step: int) -> int:
        c = self.cfg
        return c.k_final if step >= c.ramp_step else c.k_start

    def _select(self, dirs: Directions, step: int) -> list[int]:
        c = self.cfg
        if c.layers is not None:
            return sorted(c.layers)
        try:
            return select_layers(dirs, self._k(step), c.layer_score, c.band[0], c.band[1])
        except ValueError as e:
            raise HarcError(f"layer selection: {e}") from e

    @torch.no_grad()
    def heldout_check(self, dirs: Directions | None = None, layers=None) -> dict:
        """Mean cos(h(t_inst), v_harm) and cos(h(t_post), v_ref) of held-out harmful vs harmless
        prompts on the selected layers: the gap should stay (or grow) positive."""
        dirs, layers = dirs or self.dirs, layers or self.layers
        out = {}
        for side in ("harmful", "harmless"):
            prompts = _prompts(self.data.get(f"val_{side}", []))
            if not prompts:
                return {}
            was = self.model.training
            self.model.eval()
            try:
                p = prompt_projections(self.model, self.chat, prompts, dirs, slots=layers,
                                       batch_size=self.cfg.extract_batch_size)
            finally:
                self.model.train(was)
            out[side] = {"p_harm": p[..., 0].mean(0).tolist(), "p_ref": p[..., 1].mean(0).tolist()}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out["gap_harm"] = mean(out["harmful"]["p_harm"]) - mean(out["harmless"]["p_harm"])
        out["gap_ref"] = mean(out["harmful"]["p_ref"]) - mean(out["harmless"]["p_ref"])
        return out

    def refresh(self) -> dict:
        """Re-extract with the current adapter, blend against the base, re-select layers (§5)."""
        t0 = time.perf_counter()
        fresh = self._extract(self.model)
        new = self.base_dirs.blend(fresh, self.cfg.beta)
        new.meta = {**self.base_dirs.meta, "blend_beta": self.cfg.beta, "refreshed_at": self.step}
        layers = self._select(new, self.step)
        mean, lo, hi = fresh.bootstrap_interval()
        sel = layers

        def cos_mean(a: Directions, b: Directions, name: str) -> float:
            return float((getattr(a, name)[sel] * getattr(b, name)[sel]).sum(-1).mean())

        rec = {
            "event": "refresh", "step": self.step, "old_layers": self.layers, "layers": layers,
            "drift_fresh_vs_base": {n: cos_mean(fresh, self.base_dirs, n) for n in NAMES},
            "drift_new_vs_previous": {n: cos_mean(new, self.dirs, n) for n in NAMES},
            "cos_ref_harm_boot": {"layers": sel, "mean": mean[sel].tolist(),
                                  "lo": lo[sel].tolist(), "hi": hi[sel].tolist()},
        }
        self.dirs, self.layers = new, layers
        rec["heldout"] = self.heldout_check()
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec

    # ---- data order
    def _perm(self, kind: int, epoch: int) -> list[int]:
        key = (kind, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + kind * 7_919 + epoch)
            self._perms = {k: v for k, v in self._perms.items() if k[0] != kind or k[1] >= epoch - 1}
            self._perms[key] = torch.randperm(len(self.examples[KINDS[kind]]), generator=g).tolist()
        return self._perms[key]

    def micro_batch_examples(self, index: int) -> list[Example]:
        """Rows of global micro-batch `index`: a pure function of (seed, index).

        Each category is read in seeded epoch permutations; the draws of one window of micro-batches
        are sorted by length per category and dealt out in order (less padding, same composition).
        """
        c = self.cfg
        width = c.bucket_window or c.grad_accum
        w, g = divmod(index, width)
        if self._window is None or self._window[0] != w:
            groups: list[list[int]] = [[] for _ in range(width)]
            for ki, kind in enumerate(KINDS):
                n, exs = getattr(c.batch, kind), self.examples[kind]
                if not n:
                    continue
                start = w * width * n
                draw = []
                for p in range(start, start + width * n):
                    epoch, i = divmod(p, len(exs))
                    draw.append(self._perm(ki, epoch)[i])
                draw.sort(key=lambda i, exs=exs: exs[i].length)
                for j in range(width):
                    groups[j].extend((ki, i) for i in draw[j * n:(j + 1) * n])
            self._window = (w, groups)
        return [self.examples[KINDS[k]][i] for k, i in self._window[1][g]]

    # ---- training
    def _micro_step(self, mb: MicroBatch, scale: float):
        if self._dev_dirs is None or self._dev_dirs[0] is not self.dirs:
            self._dev_dirs = (self.dirs, self.dirs.to(self.device))
        return micro_step(self.model, mb, self._dev_dirs[1], self.layers, margin=self.cfg.margin,
                          weights=dataclasses.asdict(self.cfg.weights), backward_scale=scale,
                          chunk=self.cfg.logits_chunk)

    def _optimizer_step(self) -> dict | None:
        """One optimizer step; its log record, or None when it was dropped as non-finite."""
        c = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        sums = {k: torch.zeros((), device=self.device) for k in TERMS}
        proj_sum: dict[str, Tensor] = {}
        counts = torch.zeros(2, device=self.device)
        tokens = padded = 0
        w = dataclasses.asdict(c.weights)
        for a in range(c.grad_accum):
            exs = self.micro_batch_examples(self.step * c.grad_accum + a)
            mb = collate(exs, self.chat.tail_len, self.chat.tokenizer.pad_token_id,
                         c.pad_multiple).to(self.device)
            terms, proj = self._micro_step(mb, 1.0 / c.grad_accum)
            for k, v in terms.items():
                sums[k] += v / c.grad_accum
            # Projection statistics: per category (harmful / retain) and layer, summed over rows.
            masks = torch.stack([mb.is_harmful, ~mb.is_harmful]).float()  # [2, B]
            counts += masks.sum(1)
            for k, v in proj.items():
                s = torch.einsum("lb,cb->cl", v.detach().float(), masks)
                proj_sum[k] = proj_sum.get(k, 0) + s
            tokens += mb.n_real
            padded += mb.n_padded
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, c.max_grad_norm if c.max_grad_norm else float("inf"))
        vals = {k: float(v) for k, v in sums.items()}  # one sync per optimizer step
        vals["grad_norm"] = float(grad_norm)
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(bad, vals)
            self.scheduler.step()  # keeps the step -> lr schedule
            return None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        loss = sum(w[k] * vals[k] for k in w)
        cnt = counts.clamp(min=1).cpu()
        proj_rec = {}
        for k, s in proj_sum.items():
            m = (s.cpu() / cnt[:, None])
            proj_rec[k] = {"harmful": [round(x, 5) for x in m[0].tolist()],
                           "retain": [round(x, 5) for x in m[1].tolist()]}
        return {"step": self.step + 1, "lr": lr, "loss": loss, **vals, "layers": self.layers,
                "proj": proj_rec, "tokens": tokens, "padded_tokens": padded,
                "tokens_per_s": tokens / dt, "step_s": dt}

    def _nonfinite(self, bad: list[str], vals: dict) -> None:
        # An isolated non-finite gradient happens in long bf16 runs (one in 1,642 steps of the
        # replication, every loss finite): drop that update; repeated ones mean divergence.
        self.skipped += 1
        stop = self.skipped > self.cfg.skip_nonfinite
        self._log({"event": "nonfinite", "step": self.step + 1, "terms": bad,
                   "skipped": self.skipped, "stopped": stop, **vals})
        if not stop:
            return
        ckpt = self.latest_checkpoint()
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise HarcError(
            f"non-finite {', '.join(bad)} at step {self.step + 1} (non-finite step "
            f"{self.skipped}, skip_nonfinite={self.cfg.skip_nonfinite}); training stopped without "
            f"applying it; {where}. Lower lr, raise warmup_steps or set max_grad_norm")

    def train(self) -> Path:
        """Train to `config.steps` (resuming if asked); returns the final adapter folder."""
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._maybe_resume()
        if self.step == 0:
            atomic_write_json(self.out / "config.json", config_dict(c))
            self.base_dirs.save(self.out / "base_directions.safetensors")
            self._log({"event": "start", "step": 0, "layers": self.layers,
                       "trainable_params": sum(p.numel() for p in self.params),
                       "heldout": self.heldout_check(), "harc_version": __version__})
        bar = self._progress()
        task = bar.add_task("HARC", total=c.steps, completed=self.step, loss=float("nan"), tps=0.0)
        with bar, compiled_blocks(self.model, c.compile):
            while self.step < c.steps:
                rec = self._optimizer_step()
                self.step += 1
                if rec is None:  # dropped (non-finite); the data order moves on regardless
                    bar.update(task, completed=self.step)
                else:
                    self._log(rec)
                    bar.update(task, completed=self.step, loss=rec["loss"],
                               tps=rec["tokens_per_s"])
                if c.refresh_every and self.step % c.refresh_every == 0 and self.step < c.steps:
                    bar.update(task, description="HARC (refreshing directions)")
                    self._log(self.refresh())
                    bar.update(task, description="HARC")
                elif c.layers is None and self._k(self.step) != len(self.layers):
                    old, self.layers = self.layers, self._select(self.dirs, self.step)
                    self._log({"event": "ramp", "step": self.step, "old_layers": old,
                               "layers": self.layers})
                if self.step == c.steps or (c.checkpoint_every and
                                            self.step % c.checkpoint_every == 0):
                    self.save_checkpoint()
        final = self.save_adapter(self.out / "adapter")
        self.dirs.save(self.out / "directions.safetensors")
        self._log({"event": "end", "step": self.step, "layers": self.layers,
                   "heldout": self.heldout_check()})
        return final

    def _progress(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"),
                        TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                        TimeRemainingColumn(), disable=not self.progress, transient=False)

    # ---- logging
    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def _log(self, rec: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")

    # ---- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        ptr = self.ckpt_dir / "latest"
        if not ptr.is_file():
            return None
        path = self.ckpt_dir / ptr.read_text().strip()
        return path if path.is_dir() else None

    def save_adapter(self, target: Path) -> Path:
        """The PEFT adapter plus harc_adapter.json (base identity, layers, config), atomically."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "harc_adapter.json").write_text(json.dumps(
            {**model_identity(self.model), "harc_version": __version__, "step": self.step,
             "layers": self.layers, "config": config_dict(self.cfg)}, indent=2, default=str))
        _replace_dir(tmp, target)
        return target

    def save_checkpoint(self) -> Path:
        """Adapter, optimizer, scheduler, RNG, step and directions, written as one folder that
        appears atomically; then the `latest` pointer moves and old checkpoints are pruned."""
        from safetensors.torch import save_file

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.step:07d}"
        tmp = Path(tempfile.mkdtemp(dir=self.ckpt_dir, prefix=f".{name}."))
        self.save_adapter(tmp / "adapter")
        opt = self.optimizer.state_dict()
        tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
                   for i, st in opt["state"].items() for k, v in st.items() if isinstance(v, Tensor)}
        scalars = {f"{i}.{k}": v for i, st in opt["state"].items()
                   for k, v in st.items() if not isinstance(v, Tensor)}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng_t, rng_py = _rng_state()
        save_file({k: v.contiguous() for k, v in rng_t.items()}, str(tmp / "rng.safetensors"))
        self.dirs.save(tmp / "directions.safetensors")
        self.base_dirs.save(tmp / "base_directions.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps({
            "step": self.step, "skipped": self.skipped, "layers": self.layers,
            "param_groups": opt["param_groups"],
            "optimizer_scalars": scalars, "scheduler": self.scheduler.state_dict(),
            "python_rng": rng_py, "config": config_dict(self.cfg), "harc_version": __version__,
        }, default=str))
        target = self.ckpt_dir / name
        _replace_dir(tmp, target)
        atomic_write_text(self.ckpt_dir / "latest", name)
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _maybe_resume(self) -> None:
        c = self.cfg
        if c.resume == "never":
            if self.latest_checkpoint():
                raise HarcError(f"{self.out} already holds checkpoints; choose another "
                                "output_dir, or set resume=auto to continue that run")
            return
        path = self.latest_checkpoint() if c.resume == "auto" else Path(c.resume)
        if path is not None:
            self.load_checkpoint(path)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        state_file = path / "trainer_state.json"
        if not state_file.is_file():
            raise HarcError(f"{path} is not a harc checkpoint (no trainer_state.json)")
        st = json.loads(state_file.read_text())
        mine, theirs = config_dict(self.cfg), st["config"]
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in _RESUME_FREE and mine.get(k) != theirs.get(k))
        if diff:
            raise HarcError(f"cannot resume from {path}: config keys changed since: {diff}; "
                            "restore them or start a new output_dir")
        adapter = path / "adapter"
        weights = load_file(str(next(adapter.glob("adapter_model*.safetensors"))))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise HarcError(f"checkpoint adapter does not fit this model: {result.unexpected_keys[:3]}")
        tensors = load_file(str(path / "optimizer.safetensors"))
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v.to(self.device)
        for key, v in st["optimizer_scalars"].items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})
        self.scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(load_file(str(path / "rng.safetensors")), st["python_rng"])
        self.base_dirs = Directions.load(path / "base_directions.safetensors")
        self.dirs = Directions.load(path / "directions.safetensors")
        self.layers = list(st["layers"])
        self.step = int(st["step"])
        self.skipped = int(st.get("skipped", 0))
        self._window = None
        # Drop log records from after the checkpoint (written before the interruption).
        if self.log_path.is_file():
            keep = [line for line in self.log_path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= self.step
                    and json.loads(line).get("event") != "end"]
            atomic_write_text(self.log_path, "".join(x + "\n" for x in keep))
        self._log({"event": "resume", "step": self.step, "checkpoint": str(path)})


# ---------------------------------------------------------------------------------------- CLI

def train_command(config: str, overrides: list[str] | None = None) -> Path:
    """Body of `harc train CONFIG [key=value ...]`: validate, load data and model, train."""
    from rich.console import Console

    from harc.models import load_model

    console = Console(stderr=True)
    cfg = load_config(config, overrides or [])
    data = load_data(cfg)  # data problems surface before the (slow) model load
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    console.print(f"loading {cfg.model} ...")
    model, tok = load_model(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation)
    trainer = HarcTrainer(cfg, model, tok, data, progress=True)
    console.print(f"training layers {trainer.layers} for {cfg.steps} steps -> {cfg.output_dir}")
    adapter = trainer.train()
    console.print(f"adapter: {adapter}  log: {trainer.log_path}")
    return adapter


def _dump_yaml(cfg: HarcConfig) -> str:
    import yaml

    return yaml.safe_dump(config_dict(cfg), sort_keys=False)


def save_config(cfg: HarcConfig, path: str | Path) -> Path:
    """Write a config as YAML (what `load_config` reads back)."""
    return atomic_write(path, lambda p: p.write_text(_dump_yaml(cfg)))
