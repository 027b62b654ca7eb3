"""Set-up shared by the tests of harc's Triton kernels (decode attention, RMSNorm, rotary)."""

import os

import pytest
import torch


def kernel_device() -> str:
    """Where the kernels run here: CUDA, or the CPU under Triton's interpreter (tests/conftest.py
    turns it on without a GPU). Skips the calling test module without Triton or either."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off", allow_module_level=True)
    return dev


def forget_failures(monkeypatch, module, var: str) -> None:
    """The kernel's default choice (`var` unset) and no failure remembered from another test."""
    monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(module, "_broken", [])
