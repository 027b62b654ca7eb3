"""`ServeConfig`: what `harc serve` loads and exposes, read from YAML with command-line overrides.

Every served name is one of: the base model (`name`, default: the model spec), an adapter
(`adapters: {name: folder}`) or a policy (`policies: {name: {base, layers}}`): an adapter or the
base behind a list of policy layers, which are the evaluation engine's plugins
(`harc.eval.filters`). Clients pick one with the request's `model` field.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from harc.config import Config, apply_overrides, build, read_yaml
from harc.errors import HarcError
from harc.eval.filters import FILTERS

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."
DEFAULT_MAX_TOKENS = 256


class LayerContext(Config):
    """Where a layer that needs directions (`Filter.needs_directions`) finds them; given on the
    policy for all its layers, or on one layer.

    directions: directions.safetensors from `harc extract`. layer: the slot the layer reads
    (default: the plane layer, the middle of the 4 selected layers, as `harc eval` reads).
    heldout: validation prompts {"harmful", "harmless"} a layer calibrates on (default:
    heldout.json beside the directions, written by `harc extract`).
    """

    directions: Path | None = None
    layer: int | None = Field(None, ge=0)
    heldout: Path | None = None


class LayerConfig(LayerContext):
    """One policy layer: a `harc.eval.filters` plugin name, or a mapping {name, **options} whose
    other keys are the plugin's options (`directions`, `layer` and `heldout` excepted; an
    `options:` mapping is read too, as the resolved config writes it)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_and_options(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if not isinstance(data, Mapping):
            return data
        own = set(cls.model_fields) - {"options"}
        options = data.get("options") or {}
        if not isinstance(options, Mapping):
            return data  # validation names the key
        return {**{k: v for k, v in data.items() if k in own},
                "options": {**options, **{k: v for k, v in data.items()
                                          if k not in own and k != "options"}}}


class PolicyConfig(LayerContext):
    """A served policy: `base` (the base name or an adapter name) behind `layers`, in order; the
    first layer that blocks answers with `refusal`."""

    base: str
    layers: list[LayerConfig] = Field(min_length=1)
    refusal: str = Field(DEFAULT_REFUSAL, min_length=1)

    def context(self, layer: LayerConfig) -> LayerContext:
        """The layer's directions settings, each falling back to the policy's."""
        return LayerContext(**{k: getattr(layer, k) if getattr(layer, k) is not None
                               else getattr(self, k) for k in LayerContext.model_fields})


class Limits(Config):
    """max_tokens: the largest max_tokens a request may ask for. default_max_tokens: max_tokens when
    a request gives none (default 256, at most max_tokens). max_prompt_tokens: the rendered
    conversation's length cap. max_concurrent_requests: beyond it, 429. max_body_bytes: beyond it,
    413."""

    prefix: ClassVar[str] = "limits."

    max_tokens: int = Field(512, ge=1)
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_prompt_tokens: int = Field(4096, ge=16)
    max_concurrent_requests: int = Field(64, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)

    @model_validator(mode="before")
    @classmethod
    def _default_follows_cap(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "default_max_tokens" not in data:
            cap = data.get("max_tokens")
            if isinstance(cap, int) and not isinstance(cap, bool):
                data = {**data, "default_max_tokens": min(DEFAULT_MAX_TOKENS, cap)}
        return data

    def check(self) -> None:
        self.need(1 <= self.default_max_tokens <= self.max_tokens, "default_max_tokens",
                  f"must lie in [1, max_tokens={self.max_tokens}]")


class Batching(Config):
    """max_batch_size: requests per generate call. wait_ms: how long a batch collects requests."""

    prefix: ClassVar[str] = "batching."

    max_batch_size: int = Field(16, ge=1)
    wait_ms: float = Field(10.0, ge=0, le=1000)


class ServeConfig(Config):
    """model: built-in name, folder, .gguf or hub id. name: served name of the base model (default:
    model). device / dtype: as `harc.models.load_model` (default: cuda if available / bf16 on GPU,
    float32 on CPU). threads: torch CPU threads (default: torch's; 1 on a CPU shared with other
    work, where OpenMP threads waiting on each other waste most of the time). adapters: served
    name -> PEFT adapter folder. policies: served name -> PolicyConfig. host / port: where to
    listen (loopback unless an API key is given; port 0: a free one). api_key_env: the
    environment variable holding the Bearer key (the key never goes in YAML). audit_log: JSON
    lines of blocked requests. drain_timeout_s: on shutdown, how long in-flight requests may
    take."""

    model: str = "smollm2-135m-instruct"
    name: str | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int | None = Field(None, ge=1)
    adapters: dict[str, Path] = Field(default_factory=dict)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = None
    audit_log: Path | None = None
    drain_timeout_s: float = Field(30.0, ge=0)

    @property
    def base_name(self) -> str:
        return self.name or self.model

    def check(self) -> None:
        names = self.served_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise HarcError(f"served names must be unique; {dup} repeat (name, adapters, "
                            "policies)")
        for n in names:
            if not n or len(n) > 128 or any(c.isspace() for c in n):
                raise HarcError(f"served name {n!r} must be 1-128 characters without spaces")
        for a in self.adapters:
            if not a.replace("-", "").replace("_", "").isalnum():
                raise HarcError(f"config key 'adapters.{a}': an adapter name may hold only "
                                "letters, digits, - and _ (it names a PEFT module)")
            if a in "lora_":  # PEFT matches weight names by this prefix; such names clash
                raise HarcError(f"config key 'adapters.{a}': the name is part of PEFT's 'lora_' "
                                "prefix; choose another")
        for pname, p in self.policies.items():
            if p.base != self.base_name and p.base not in self.adapters:
                raise HarcError(f"config key 'policies.{pname}.base': {p.base!r} is neither the "
                                f"base model {self.base_name!r} nor an adapter "
                                f"{sorted(self.adapters)}")
            for i, layer in enumerate(p.layers):
                _check_layer(p, layer, f"policies.{pname}.layers.{i}")

    def adapter_of(self, served: str) -> str | None:
        """Adapter behind a served name (None: the base model)."""
        target = self.policies[served].base if served in self.policies else served
        return target if target in self.adapters else None

    def served_names(self) -> list[str]:
        return [self.base_name, *self.adapters, *self.policies]


def _check_layer(policy: PolicyConfig, layer: LayerConfig, key: str) -> None:
    """Build the plugin once, so that an unknown name or a bad option fails before loading."""
    try:
        plugin = FILTERS.create(layer.name, **layer.options)
    except HarcError as e:
        raise HarcError(f"config key '{key}': {e}") from None
    if plugin.needs_directions and policy.context(layer).directions is None:
        raise HarcError(f"config key '{key}': policy layer {layer.name!r} reads directions; set "
                        "directions: (from `harc extract`) on the policy or the layer")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_serve_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                      adapters: Sequence[str] = (), filters: Sequence[str] = (),
                      directions: Path | None = None, **fields: Any) -> ServeConfig:
    """The YAML file (keys at the top or under `serve:`), then `key=value` overrides, then the
    command-line options: `adapters` ("NAME=FOLDER", the override `adapters.NAME=FOLDER`, or
    "FOLDER", served under the folder's name), `filters` (each adds a policy NAME+FILTER for the
    base and every adapter, as `harc eval --filter` does, reading `directions`) and `fields`
    (top-level keys; None leaves a key as it is)."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)[0]
        raw = raw.get("serve", raw)
        if not isinstance(raw, dict):
            raise HarcError(f"{path}: the serve: section must hold a mapping of ServeConfig keys")
    adapter_items = [f"adapters.{a}" if "=" in a else f"adapters.{Path(a).name}={json.dumps(a)}"
                     for a in adapters]
    raw = apply_overrides(raw, [*adapter_items, *overrides])
    raw.update({k: str(v) if isinstance(v, Path) else v for k, v in fields.items() if v is not None})
    cfg = build(ServeConfig, raw)
    if not filters:
        return cfg
    for f in filters:
        if FILTERS.get(f).needs_directions and directions is None:
            raise HarcError(f"the {f} filter needs --directions (from `harc extract`)")
    raw["policies"] = {**(raw.get("policies") or {}), **{
        f"{base}+{f}": {"base": base, "layers": [f],
                        **({"directions": str(directions)} if directions else {})}
        for f in filters for base in [cfg.base_name, *cfg.adapters]}}
    return build(ServeConfig, raw)
