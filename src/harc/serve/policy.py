"""Served policies: a target (the base model or an adapter) behind policy layers, which are the
evaluation engine's plugins (`harc.eval.filters`), bound as `harc eval` binds them.

The server uses two hooks of a layer, both running in the engine's worker thread with the
target's adapter active (so a layer may run the model, as the latent filter does) and both
reading the request's system and user text:
- `flags(prompts) -> [bool]`: input screening, before generation; a flagged request costs no
  generation;
- `check_output(prompts, responses) -> [bool]`, optional: an output check, after generation and
  before the answer leaves the server.
The first layer that flags a request blocks it: the client gets a normal chat completion whose
content is the policy's refusal, with `finish_reason: "content_filter"` and `harc.blocked_by`
naming the layer, and the request is written to the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harc.directions import Directions
from harc.errors import HarcError
from harc.eval.filters import Filter, PolicyContext, get_filter
from harc.layers import plane_layer, select_layers
from harc.serve.config import LayerContext, ServeConfig

K_SELECTED = 4  # layers selected from the directions; the plane layer is their middle


@dataclass
class Target:
    """One served name: which adapter answers (None: the base model) and behind which layers."""

    name: str
    adapter: str | None
    layers: list[Filter] = field(default_factory=list)
    refusal: str = ""

    @property
    def input_layers(self) -> list[Filter]:
        return [layer for layer in self.layers if screens_input(layer)]

    @property
    def output_layers(self) -> list[Filter]:
        return [layer for layer in self.layers if has_output_check(layer)]


def has_output_check(layer: Filter) -> bool:
    return callable(getattr(layer, "check_output", None))


def screens_input(layer: Filter) -> bool:
    return type(layer).flags is not Filter.flags


def output_flags(layer: Filter, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    return [bool(f) for f in layer.check_output(list(prompts), list(responses))]


def _context(c: LayerContext, model, chat, loaded: dict) -> PolicyContext:
    """The PolicyContext of a layer: directions, the slot to read and validation prompts."""
    if c.directions is None:
        return PolicyContext(model, chat)
    if c.directions not in loaded:
        loaded[c.directions] = Directions.load(c.directions, model)
    dirs = loaded[c.directions]
    if c.layer is None:
        try:
            layer = plane_layer(select_layers(dirs, K_SELECTED))
        except ValueError as e:  # too few layers for the selection band
            raise HarcError(f"policy layer: {e}; set layer: explicitly") from None
    elif c.layer < dirs.n_slots:
        layer = c.layer
    else:
        raise HarcError(f"policy layer: layer {c.layer} is outside 0..{dirs.n_slots - 1} of "
                        f"{c.directions}")
    path = Path(c.heldout or Path(c.directions).parent / "heldout.json")
    harmful, harmless = [], []
    if c.heldout is not None or path.is_file():
        try:
            val = json.loads(path.read_text(encoding="utf-8"))
            harmful, harmless = list(val["harmful"]), list(val["harmless"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HarcError(f"cannot read validation prompts {{harmful, harmless}} from {path} "
                            f"({type(e).__name__}); give heldout: from `harc extract`") from None
    return PolicyContext(model, chat, dirs, layer, harmful, harmless)


def build_targets(cfg: ServeConfig, model, chat, activate) -> dict[str, Target]:
    """Every served name as a Target with its layers bound; `activate(adapter)` is the engine's
    context manager that puts the model in the state the layers calibrate in."""
    targets = {cfg.base_name: Target(cfg.base_name, None)}
    targets.update({name: Target(name, name) for name in cfg.adapters})
    loaded: dict = {}
    for name, p in cfg.policies.items():
        adapter = cfg.adapter_of(name)
        layers = []
        with activate(adapter):
            for spec in p.layers:
                layer = get_filter(spec.name, **spec.options)
                if not (screens_input(layer) or has_output_check(layer)):
                    raise HarcError(f"policy {name!r}: layer {spec.name!r} neither screens "
                                    "inputs (flags) nor checks outputs (check_output), the two "
                                    "hooks harc serve runs")
                layers.append(layer.bind(_context(p.context(spec), model, chat, loaded)))
        targets[name] = Target(name, adapter, layers, p.refusal)
    return targets
