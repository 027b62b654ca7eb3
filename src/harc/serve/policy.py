"""Policy layers: checks in front of (input) or behind (output) a served model.

A served policy is a target (the base model or an adapter) plus an ordered list of layers. The
first layer that flags a request blocks it: the client gets a normal chat completion whose content
is the policy's refusal text, with `finish_reason: "content_filter"` and `harc.blocked_by` naming
the layer, and the request is written to the audit log. Layers run in the engine's worker thread
with the target's adapter active, so a layer may run the model (the latent filter does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harc.errors import HarcError
from harc.serve.config import KeywordLayer, LatentLayer, ServeConfig


class PolicyLayer:
    """Base of all layers; a subclass overrides the stage(s) it checks. True blocks an item."""

    name: str = "layer"

    def check_input(self, prompts: Sequence[str]) -> list[bool]:
        return [False] * len(prompts)

    def check_output(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        return [False] * len(prompts)


class InputFilterLayer(PolicyLayer):
    """A harc.filters input filter (anything with `.name` and `.flags(prompts)`) as a layer."""

    def __init__(self, input_filter):
        self.filter, self.name = input_filter, input_filter.name

    def check_input(self, prompts: Sequence[str]) -> list[bool]:
        return [bool(f) for f in self.filter.flags(list(prompts))]


@dataclass
class Target:
    """One served name: which adapter answers (None: the base model) and behind which layers."""

    name: str
    adapter: str | None
    layers: list[PolicyLayer] = field(default_factory=list)
    refusal: str = ""


def _latent(c: LatentLayer, model, chat) -> PolicyLayer:
    from harc.directions import Directions
    from harc.filters import LatentFilter
    from harc.layers import select_layers

    dirs = Directions.load(c.directions, model)
    if c.layer is None:
        try:
            sel = select_layers(dirs, 4)
        except ValueError as e:  # too few layers for the selection band
            raise HarcError(f"latent layer: {e}; set layer: explicitly") from None
        layer = sel[len(sel) // 2]
    elif 0 <= c.layer < dirs.n_slots:
        layer = c.layer
    else:
        raise HarcError(f"latent layer {c.layer} is outside 0..{dirs.n_slots - 1}")
    if c.threshold is not None:
        return InputFilterLayer(LatentFilter(model, chat, dirs, layer, c.threshold))
    held_path = Path(c.heldout or Path(c.directions).parent / "heldout.json")
    try:
        held = json.loads(held_path.read_text(encoding="utf-8"))
        harmful, harmless = held["harmful"], held["harmless"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HarcError(f"the latent layer needs a threshold or calibration prompts: {held_path} "
                        f"({type(e).__name__}); set threshold: or heldout:") from None
    return InputFilterLayer(LatentFilter.calibrate(model, chat, dirs, layer, harmful, harmless))


def build_layer(c: KeywordLayer | LatentLayer, model, chat) -> PolicyLayer:
    if isinstance(c, KeywordLayer):
        from harc.filters import KEYWORDS, KeywordFilter

        return InputFilterLayer(KeywordFilter(c.keywords or KEYWORDS))
    return _latent(c, model, chat)


def build_targets(cfg: ServeConfig, model, chat, activate) -> dict[str, Target]:
    """Every served name as a Target; `activate(adapter)` is the engine's context manager that
    puts the model in the state a layer is calibrated in."""
    targets = {cfg.base_name: Target(cfg.base_name, None)}
    targets.update({name: Target(name, name) for name in cfg.adapters})
    for name, p in cfg.policies.items():
        adapter = cfg.adapter_of(name)
        with activate(adapter):
            layers = [build_layer(c, model, chat) for c in p.layers]
        targets[name] = Target(name, adapter, layers, p.refusal)
    return targets
