"""Training data: config paths resolved, records loaded through the dataset registry, and the
extraction / validation sets split off so that validation prompts never reach training."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from harc.data import load
from harc.data.registry import DATASETS
from harc.errors import HarcError
from harc.methods.config import DATA_SUFFIXES, KINDS, TrainConfig

_DATA_KEYS = ("harmful", "harmless", "pseudo", "extract_harmful", "extract_harmless",
              "val_harmful", "val_harmless")


def _looks_like_path(s: str) -> bool:
    return s.lower().endswith(DATA_SUFFIXES) or s.startswith(("/", "./", "../", "~"))


def resolve_file(value: str, base: Path | None, key: str) -> str:
    """Absolute path of a data/directions file; a HarcError naming `key` if it does not exist."""
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([base / p] if base else [])
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    raise HarcError(f"config key {key!r}: file not found: {value}")


def resolve_paths(cfg: TrainConfig, base: Path | None) -> TrainConfig:
    """Data entries become absolute paths or checked registry names; model and directions files
    are resolved against the working directory, then the config's folder `base`."""
    for name in _DATA_KEYS:
        value = getattr(cfg.data, name)
        if not isinstance(value, str):
            continue
        if _looks_like_path(value) or Path(value).exists():
            setattr(cfg.data, name, resolve_file(value, base, f"data.{name}"))
        elif value not in DATASETS:
            try:
                DATASETS.get(value)
            except HarcError as e:
                raise HarcError(f"config key 'data.{name}': {e}") from None
    if getattr(cfg, "directions", None):
        cfg.directions = resolve_file(cfg.directions, base, "directions")
    if cfg.model.endswith(".gguf") or cfg.model.startswith(("/", "./", "../", "~")):
        cfg.model = resolve_file(cfg.model, base, "model")
    return cfg


def load_records(spec: str, limit: int | None = None) -> list[dict]:
    """Records of one data entry (registry name or file); `limit` keeps the first N."""
    return list(load(spec, limit=limit))


def load_data(cfg: TrainConfig) -> dict[str, list[dict]]:
    """Every data entry of the config, loaded (missing optional entries are left out)."""
    out = {}
    for name in _DATA_KEYS:
        spec = getattr(cfg.data, name)
        if spec:
            recs = load_records(spec, getattr(cfg.data, f"{name}_n", None))
            if not recs:
                raise HarcError(f"data.{name} ({spec}) is empty")
            out[name] = recs
    return out


def prompts_of(recs: Sequence) -> list[str]:
    return [r if isinstance(r, str) else r["prompt"] for r in recs]


def _check_fields(name: str, recs: Sequence, fields: tuple[str, ...]) -> None:
    for i, r in enumerate(recs):
        if not isinstance(r, Mapping):
            raise HarcError(f"data.{name}[{i}] must be a mapping with fields {fields}")
        missing = [f for f in fields if not isinstance(r.get(f), str) or not r[f].strip()]
        if missing:
            raise HarcError(f"data.{name}[{i}] lacks a non-empty {missing[0]!r} "
                            f"(needs {', '.join(fields)})")


def split_data(cfg: TrainConfig, data: Mapping[str, Sequence], *,
               harmful_fields: tuple[str, ...] = ("prompt", "refusal"),
               need_extraction: bool = True) -> dict[str, list]:
    """Fill in extraction and validation sets and keep validation prompts out of training.

    Extraction prompts: the first `extract_n` of a seeded shuffle of `extract_*` (default: the
    training set); validation: the next `val_n` of it unless given, removed from training.
    Response-side extraction ("extract_*_resp"): the extraction records when they carry the
    texts, else the first `extract_n` shuffled training records that do. `harmful_fields` are the
    fields every harmful training record needs (the method's targets).
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
            out[val_key] = prompts_of(pool[n: n + cfg.data.val_n])
    held = set(prompts_of(out.get("val_harmful", [])) + prompts_of(out.get("val_harmless", [])))
    for k in KINDS:
        if k in out:
            kept = [r for r in out[k] if r.get("prompt") not in held]
            if not kept:
                raise HarcError(f"every data.{k} prompt is also a validation prompt")
            out[k] = kept
    _check_fields("harmful", out["harmful"], harmful_fields)
    for k in ("harmless", "pseudo"):
        if k in out:
            _check_fields(k, out[k], ("prompt", "response"))
    for side, fields in (("harmful", ("refusal", "completion")), ("harmless", ("response",))):
        def has(r, fields=fields):
            return all(isinstance(r.get(f), str) and r[f].strip() for f in fields)
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
