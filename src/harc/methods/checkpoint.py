"""Checkpoint pieces: RNG state, optimizer state as safetensors + JSON (never pickle), and folders
that appear atomically."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


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


def load_rng(path: Path, py_state: list) -> None:
    tensors = load_file(str(path))
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


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path, st: dict, device) -> None:
    state: dict[int, dict] = {}
    for key, v in load_file(str(path)).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v.to(device)
    for key, v in st["optimizer_scalars"].items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": st["param_groups"]})


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; an existing one is swapped out, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
