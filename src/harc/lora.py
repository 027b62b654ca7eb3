"""LoRA adapters: attach (PEFT), the fused LoRA projection of the training step, loading a saved
adapter after a compatibility check, and merging."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
import weakref
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from harc.errors import HarcError
from harc.io import atomic_write_text, safetensors_header
from harc.models import (
    BUILTIN_MODELS,
    DEFAULT_TARGET_MODULES,
    check_identity,
    model_identity,
    split_revision,
    unwrap,
)

# PEFT 0.21 still reads a transformers property that transformers 5 deprecates, on every adapter
# load and save: nothing a harc user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def attach_lora(model, *, r: int = 32, alpha: int = 64, dropout: float = 0.0,
                target_modules=DEFAULT_TARGET_MODULES):
    """Wrap the model with a fresh LoRA adapter (PEFT); base weights stay frozen."""
    names = {n.rsplit(".", 1)[-1] for n, _ in unwrap(model).named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise HarcError(f"LoRA target modules {missing} do not exist in this model")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, with the LoRA product accumulated into y by one GEMM.

    PEFT computes B(A x) as a new [N, out] tensor, scales it and adds it to y: three extra passes
    over the widest activation of every projection, forward and backward. Here the scaling goes on
    the [N, r] side and the product lands in y in place (`addmm_`); backward mirrors it, adding
    the LoRA input gradient into x's. Everything runs in the base weight's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        dt = weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)
            y = nn.functional.linear(x2, weight, bias)
            a = nn.functional.linear(x2, lora_a.to(dt)).mul_(scaling)
            y.addmm_(a, lora_b.to(dt).t())
        ctx.save_for_backward(x2, weight, lora_a, lora_b, a)
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, lora_a, lora_b, a = ctx.saved_tensors
        dt = weight.dtype
        need_x, need_w, need_b, need_la, need_lb, _ = ctx.needs_input_grad
        gx = gw = gbias = gla = glb = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(dt)
            ga = (g @ lora_b.to(dt)).mul_(ctx.scaling)  # gradient w.r.t. x A^T
            if need_x:
                gx = (g @ weight).addmm_(ga, lora_a.to(dt)).view(ctx.x_shape).to(ctx.x_dtype)
            if need_w:
                gw = (g.t() @ x2).to(weight.dtype)
            if need_b:
                gbias = g.sum(0)
            if need_la:
                gla = (ga.t() @ x2).to(lora_a.dtype)
            if need_lb:
                glb = (g.t() @ a).to(lora_b.dtype)
        return gx, gw, gbias, gla, glb, None


@functools.cache
def _fused_class():
    """A subclass of PEFT's `lora.Linear` whose forward runs the plain case (one active adapter,
    no dropout, no DoRA-style variant, unmerged) through `_LoraLinear`, and anything else
    through PEFT. Swapping the class (not patching instances) keeps one code path for
    torch.compile to guard on."""
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        def forward(self, x, *args, **kwargs):
            names = [n for n in self.active_adapters if n in self.lora_A]
            if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
                    or names[0] in self.lora_variant
                    or not isinstance(self.lora_dropout[names[0]], nn.Identity)):
                return super().forward(x, *args, **kwargs)
            n, base = names[0], self.base_layer
            return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[n].weight,
                                     self.lora_B[n].weight, float(self.scaling[n]))

    return Linear, FusedLoraLinear


_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tuner_layers(model) -> list[nn.Module]:
    """The model's PEFT layers (adapter layers and modules-to-save wrappers). Walking a 7B model's
    modules costs milliseconds of host time per training step, so a PEFT model's walk is kept
    until its set of adapters changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    key = tuple(getattr(model, "peft_config", None) or ())
    hit = _LAYERS.get(model) if key else None
    if hit is None or hit[0] != key:
        hit = key, [m for m in model.modules()
                    if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        if key:
            _LAYERS[model] = hit
    return hit[1]


_UNSET = object()


@contextlib.contextmanager
def _flags(modules, name: str, value):
    """Inside the block each module's plain attribute `name` is `value`; afterwards each is as it
    was, unset again where it was unset. Written through the instance dict: nn.Module's
    __setattr__ would cost more than the rest."""
    before = [m.__dict__.get(name, _UNSET) for m in modules]
    for m in modules:
        m.__dict__[name] = value
    try:
        yield
    finally:
        for m, b in zip(modules, before, strict=True):
            if b is _UNSET:
                del m.__dict__[name]
            else:
                m.__dict__[name] = b


@contextlib.contextmanager
def input_casting_off(model):
    """PEFT's `disable_input_dtype_casting`: inside the block LoRA layers do not cast their input
    to the adapter weights' dtype. PEFT walks every module by name on entry and on exit (tens of
    milliseconds of host time per training step at 7B); the walk here is cached."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # PEFT reads the flag with getattr(..., True): it may be unset
    with _flags([m for m in _tuner_layers(model) if isinstance(m, BaseTunerLayer)],
                "cast_input_dtype_enabled", False):
        yield


@contextlib.contextmanager
def fused_lora(model):
    """Within the block, the model's LoRA projections run as `_LoraLinear` (same results, less
    memory traffic); hold it across backward when checkpointing recomputes the forward."""
    plain, fused = _fused_class()
    layers = [m for m in _tuner_layers(model) if type(m) is plain and type(m.base_layer) is nn.Linear]
    for m in layers:
        m.__class__ = fused
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = plain


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block: `PeftModel.disable_adapter()` for LoRA-style adapters,
    without PEFT's model-status report and requires-grad toggling on each entry (121 ms per call
    for a 28-layer model on a 2-core CPU), paid by every training step's reference forward. Adapters
    PEFT disables differently (prompt learning, trained biases) go through PEFT; a model without
    adapters passes through."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    cfgs = [model.peft_config[n] for n in model.active_adapters]
    if any(c.is_prompt_learning or c.is_adaption_prompt or getattr(c, "bias", "none") != "none"
           for c in cfgs):
        with model.disable_adapter():
            yield
        return
    with _flags(_tuner_layers(model), "_disable_adapters", True), \
            _flags([model], "_adapters_disabled", True):
        yield


def read_adapter(adapter_dir: str | Path, ident: dict | None = None) -> dict:
    """Check an adapter folder before any model is loaded; return its adapter_config.json.

    `ident` (`harc.models.peek_identity` of the base) adds the checks of the base: its name, its
    dimensions and its weights fingerprint against what the adapter records."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise HarcError(f"adapter folder not found: {adapter_dir}")
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise HarcError(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json)")
    weights = sorted(adapter_dir.glob("adapter_model*.safetensors"))
    if not weights:
        raise HarcError(f"{adapter_dir} has no adapter_model.safetensors (pickled adapters are refused)")
    if any(safetensors_header(w) is None for w in weights):
        raise HarcError(f"{weights[0]} is damaged (cut short); export or train the adapter again")
    try:
        acfg = json.loads(cfg_path.read_text())
        meta_path = adapter_dir / "harc_adapter.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except ValueError as e:
        raise HarcError(f"{adapter_dir}: a JSON file is malformed ({e})") from None
    if ident is not None:
        want = acfg.get("base_model_name_or_path") or ""
        known = {ident["model"], split_revision(ident["model"] or "")[0],
                 *ident.get("aliases", ())}
        spec = BUILTIN_MODELS.get(ident["model"] or "")
        if spec:
            known.add(spec.hf_id)
        if want and not any(_same_model(want, k) for k in known if k):
            raise HarcError(f"adapter {adapter_dir} does not fit this model: trained on {want}, "
                            f"loading onto {ident['model']}")
        check_identity(meta, ident, f"the adapter {adapter_dir}",
                       "load it onto the model it was trained on, or train it again")
    return acfg


def check_adapter_compat(model, adapter_dir: str | Path) -> dict:
    """Explain, before anything runs, why an adapter does not fit a loaded model; return its
    config."""
    adapter_dir = Path(adapter_dir)
    base = unwrap(model)
    ident = model_identity(base)
    acfg = read_adapter(adapter_dir, {**ident, "aliases": [base.config._name_or_path]})
    problems = []
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = acfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    missing = [t for t in targets if t not in names]
    if missing:
        problems.append(f"target modules {missing} are absent from {ident['architecture']}")
    meta_path = adapter_dir / "harc_adapter.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("architecture") and meta["architecture"] != ident["architecture"]:
            problems.append(f"architecture {meta['architecture']} != model's {ident['architecture']}")
        if meta.get("revision") and ident["revision"] and meta["revision"] != ident["revision"]:
            problems.append(f"base revision {meta['revision']} != model's {ident['revision']}")
    problems += _shape_problems(base, adapter_dir)
    if problems:
        raise HarcError(f"adapter {adapter_dir} does not fit this model: " + "; ".join(problems))
    return acfg


def _shape_problems(base, adapter_dir: Path) -> list[str]:
    """LoRA matrices whose width does not match the projection they adapt (an adapter of a
    model with other dimensions)."""
    modules = dict(base.named_modules())
    out = []
    for f in sorted(adapter_dir.glob("adapter_model*.safetensors")):
        header = json.loads(safetensors_header(f) or b"{}")
        for key, info in header.items():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.removeprefix("base_model.model.").split(".lora_")[0]
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                continue
            shape = info.get("shape") or []
            fits = (shape[1] == layer.in_features) if ".lora_A." in key else \
                (shape[0] == layer.out_features)
            if len(shape) == 2 and not fits:
                out.append(f"{key} has shape {shape}, but {name} maps {layer.in_features} -> "
                           f"{layer.out_features}")
                break
    return out


def _same_model(a: str, b: str) -> bool:
    norm = lambda s: s.rstrip("/").split("/")[-1].lower()  # noqa: E731
    return norm(a) == norm(b)


def _is_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def base_model_ids(spec: str) -> tuple[str, str | None]:
    """(name_or_path, hub id or None) that an adapter of the model loaded from `spec` records.

    A built-in name gives its hub id, a hub id itself. A local folder keeps its path (it may hold
    a fine-tune of what it was loaded from), with the hub id its config.json names, if any
    (`_name_or_path`, which transformers 4 wrote).
    """
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].hf_id, BUILTIN_MODELS[spec].hf_id
    if not spec or _is_hub_id(spec):
        return spec, spec or None
    config = Path(spec).expanduser() / "config.json"
    try:
        named = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        named = None
    return spec, named if isinstance(named, str) and _is_hub_id(named) else None


def make_portable(adapter_dir: str | Path, spec: str) -> None:
    """Point adapter_config.json's `base_model_name_or_path` at `base_model_ids(spec)[0]`.

    PEFT records the path the base weights were read from: for a built-in model an absolute path
    into this machine's cache, which names nothing elsewhere. A model without a name (built from
    a config) leaves the field as PEFT wrote it.
    """
    if not spec:
        return
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = base_model_ids(spec)[0]
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_adapter(model, adapter_dir: str | Path, *, trainable: bool = False):
    """Attach a saved PEFT adapter (ours or a published HARC adapter) after a compatibility check."""
    check_adapter_compat(model, adapter_dir)
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


@torch.no_grad()
def merge_and_check(peft_model, inputs: list[torch.Tensor], *, atol: float | None = None):
    """Merge the adapter into the base and return (merged_model, max |logit difference|).

    `inputs` are [1, T] token-id tensors. Raises if merged and adapter logits disagree beyond a
    bf16-scale tolerance (merging rounds the LoRA product into the base weights' dtype).
    """
    peft_model.eval()
    before = [peft_model(input_ids=ids).logits.float() for ids in inputs]
    merged = peft_model.merge_and_unload()
    merged.harc_fingerprint = None  # its weights are no longer those of the files it came from
    diff = max((b - merged(input_ids=ids).logits.float()).abs().max().item()
               for b, ids in zip(before, inputs))
    dtype = next(merged.parameters()).dtype
    half = dtype in (torch.bfloat16, torch.float16)
    tol = atol if atol is not None else (0.25 if half else 1e-3)
    if not diff <= tol:
        msg = f"merged model disagrees with adapter: max |logit diff| {diff:.4g} > {tol}"
        if half:  # weight changes below the dtype's resolution round away when merged
            name = str(dtype).removeprefix("torch.")
            msg += f"; merging into {name} weights loses small adapter updates: merge in " \
                   "float32 (--dtype float32)"
        raise HarcError(msg)
    return merged, diff
