"""Checkpoint pieces: RNG state, optimizer state as safetensors + JSON (never pickle), reading a
checkpoint whole before anything is restored, and the order in which to try checkpoints."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from harc.errors import HarcError


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # all devices


def save_rng(path: Path) -> list:
    """Torch (CPU and CUDA) generator states into `path`; returns Python's state for JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return list(random.getstate())


def load_rng(tensors: dict[str, Tensor], py_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = py_state
    random.setstate((version, tuple(state), gauss))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> dict:
    """Tensor state into `path`; returns the JSON part (param groups and scalar state)."""
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous()
               for i, st in opt["state"].items() for k, v in st.items() if isinstance(v, Tensor)}
    scalars = {f"{i}.{k}": v for i, st in opt["state"].items()
               for k, v in st.items() if not isinstance(v, Tensor)}
    save_file(tensors, str(path))
    return {"param_groups": opt["param_groups"], "optimizer_scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], st: dict,
                   device) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v.to(device)
    for key, v in st["optimizer_scalars"].items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})


class DamagedCheckpoint(HarcError):
    """A checkpoint folder that cannot be read whole (cut short by a crash, a full disk, ...)."""


@dataclass
class Checkpoint:
    path: Path
    state: dict  # trainer_state.json
    adapter: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: dict[str, Tensor]


def read_checkpoint(path: Path) -> Checkpoint:
    """Every file of a checkpoint, read and parsed before anything is restored from it."""
    if not (path / "trainer_state.json").is_file():
        raise DamagedCheckpoint(f"{path} is not a harc checkpoint (no trainer_state.json)")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        adapter = load_file(str(next((path / "adapter").glob("adapter_model*.safetensors"))))
        return Checkpoint(path, state, adapter, load_file(str(path / "optimizer.safetensors")),
                          load_file(str(path / "rng.safetensors")))
    except (OSError, ValueError, StopIteration, SafetensorError) as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({type(e).__name__}: "
                                f"{str(e)[:120]})") from None


def checkpoint_candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` names, then the others newest
    first (a damaged newest one falls back to the previous kept one)."""
    found = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), reverse=True)
    ptr = ckpt_dir / "latest"
    first = ckpt_dir / ptr.read_text().strip() if ptr.is_file() else None
    return ([first] if first in found else []) + [p for p in found if p != first]
