"""Training methods over one trainer engine: HARC first; each further method is one file.

    from harc.methods import load_config, Trainer
    cfg = load_config("configs/smollm2_135m.yaml", ["steps=50"])
    adapter = Trainer(cfg, model, tokenizer, data).train()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from harc.config import apply_overrides, build, read_yaml, to_yaml
from harc.errors import HarcError
from harc.io import atomic_write_text
from harc.methods.base import METHODS, Method, register_method
from harc.methods.config import TrainConfig
from harc.methods.data import load_data, resolve_paths
from harc.methods.engine import Trainer

# Sections of a `harc run` config that belong to the pipeline, not to training.
PIPELINE_SECTIONS = ("eval", "run", "compare")


def config_class(method: str) -> type[TrainConfig]:
    return METHODS.get(method).Config


def config_from_raw(raw: Mapping, base: Path | None = None, overrides: Sequence[str] = (), *,
                    method: str | None = None, require_data: bool = True) -> TrainConfig:
    """Validate a config mapping for its method (the `method` key, else `method`, else harc);
    relative paths resolve against `base`, the config's folder."""
    raw = apply_overrides({k: v for k, v in raw.items() if k not in PIPELINE_SECTIONS}, overrides)
    name = method or raw.get("method") or "harc"
    if method and raw.get("method", method) != method:
        raise HarcError(f"--method {method} contradicts the config's method: {raw['method']}")
    raw["method"] = name
    cls = config_class(name)
    for key in raw:
        owners = [m for m in METHODS.names() if key in config_class(m).model_fields]
        if key not in cls.model_fields and owners:
            raise HarcError(f"config key {key!r} belongs to method {' / '.join(owners)}, "
                            f"not to {name}; remove it or set method: {owners[0]}")
    cfg = build(cls, raw)
    if require_data:
        cfg.require_data()
    return resolve_paths(cfg, base)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                method: str | None = None, require_data: bool = True) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides and validate everything before any model
    is loaded: unknown keys, types, ranges and data files."""
    raw, base = read_yaml(path) if path is not None else ({}, None)
    return config_from_raw(raw, base, overrides, method=method, require_data=require_data)


def save_config(cfg: TrainConfig, path: str | Path) -> Path:
    """Write a config as YAML (what `load_config` reads back)."""
    return atomic_write_text(path, to_yaml(cfg))


__all__ = ["METHODS", "Method", "TrainConfig", "Trainer", "config_class", "config_from_raw",
           "load_config", "load_data", "register_method", "save_config"]
