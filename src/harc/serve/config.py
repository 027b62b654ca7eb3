"""`ServeConfig`: what `harc serve` loads and exposes, read from YAML with command-line overrides.

Every served name is one of: the base model (`name`, default: the model spec), an adapter
(`adapters: {name: folder}`) or a policy (`policies: {name: {base, layers}}`): an adapter or the
base behind a list of policy layers. Clients pick one with the request's `model` field.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harc.errors import HarcError

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeywordLayer(_Strict):
    """Blocks prompts containing a listed keyword (harc.filters.KeywordFilter)."""

    type: Literal["keyword"]
    keywords: list[str] | None = Field(None, description="default: harc.filters.KEYWORDS")


class LatentLayer(_Strict):
    """Blocks prompts whose residual projects on v_harm above a threshold (harc.filters.LatentFilter)."""

    type: Literal["latent"]
    directions: Path = Field(description="directions.safetensors from `harc extract`")
    layer: int | None = Field(None, description="default: the middle of the 4 selected layers")
    threshold: float | None = Field(
        None, description="default: calibrated on heldout.json beside the directions")
    heldout: Path | None = Field(None, description="default: heldout.json beside the directions")


LayerConfig = Annotated[KeywordLayer | LatentLayer, Field(discriminator="type")]


class PolicyConfig(_Strict):
    base: str = Field(description="served name of the base model or of an adapter")
    layers: list[LayerConfig] = Field(min_length=1)
    refusal: str = Field(DEFAULT_REFUSAL, min_length=1,
                         description="assistant text returned when a layer blocks")


class Limits(_Strict):
    max_tokens: int = Field(512, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request gives none (at most max_tokens)")
    max_prompt_tokens: int = Field(4096, ge=16, description="rendered conversation length cap")
    max_concurrent_requests: int = Field(64, ge=1, description="beyond it: 429")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="beyond it: 413")

    @model_validator(mode="after")
    def _default_within_cap(self):
        if "default_max_tokens" not in self.model_fields_set:
            self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        elif self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        return self


class Batching(_Strict):
    max_batch_size: int = Field(16, ge=1, description="requests per generate call")
    wait_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch collects requests")


class ServeConfig(_Strict):
    model: str = Field("smollm2-135m-instruct", description="built-in name, folder, .gguf or hub id")
    name: str | None = Field(None, description="served name of the base model (default: model)")
    device: str | None = None
    dtype: str | None = None
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: torch's); 1 on a CPU shared with "
        "other work, where OpenMP threads waiting on each other waste most of the time")
    adapters: dict[str, Path] = Field(default_factory=dict)
    policies: dict[str, PolicyConfig] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key_env: str | None = Field(
        None, description="environment variable holding the Bearer key (the key never goes in YAML)")
    audit_log: Path | None = Field(None, description="JSON lines of blocked requests")
    drain_timeout_s: float = Field(30.0, ge=0, description="graceful shutdown: wait for requests")

    @property
    def base_name(self) -> str:
        return self.name or self.model

    @model_validator(mode="after")
    def _names(self):
        names = [self.base_name, *self.adapters, *self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"served names must be unique; repeated: {dup}")
        for n in names:
            if not n or len(n) > 128 or any(c.isspace() for c in n):
                raise ValueError(f"served name {n!r} must be 1-128 characters without spaces")
        for a in self.adapters:
            if not a.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"adapter name {a!r} may hold only letters, digits, - and _ "
                                 "(it names a PEFT module)")
            if a in "lora_":  # PEFT matches weight names by this prefix; such names clash
                raise ValueError(f"adapter name {a!r} is part of PEFT's 'lora_' prefix; "
                                 "choose another")
        for pname, p in self.policies.items():
            if p.base != self.base_name and p.base not in self.adapters:
                raise ValueError(f"policy {pname!r}: base {p.base!r} is neither the base model "
                                 f"{self.base_name!r} nor an adapter {sorted(self.adapters)}")
        return self

    def adapter_of(self, served: str) -> str | None:
        """Adapter behind a served name (None: the base model)."""
        target = self.policies[served].base if served in self.policies else served
        return target if target in self.adapters else None

    def served_names(self) -> list[str]:
        return [self.base_name, *self.adapters, *self.policies]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise HarcError(f"override {dotted!r}: {key!r} is not a section")
        tree = node
    tree[leaf] = value


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      **fields: Any) -> ServeConfig:
    """The YAML file (or defaults), then `key=value` overrides (dotted keys, YAML values), then
    explicit fields that are not None (command-line options)."""
    import yaml

    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HarcError(f"serve config not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise HarcError(f"{path} is not readable YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(raw, dict):
            raise HarcError(f"{path} must hold a mapping of ServeConfig keys")
        raw = raw.get("serve", raw)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HarcError(f"override {item!r} must look like key=value")
        _set(raw, key, yaml.safe_load(value))
    for key, value in fields.items():
        if value is not None:
            _set(raw, key, value)
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise HarcError(f"serve config: {loc}: {err['msg']}{more}") from None
