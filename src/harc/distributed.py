"""Data parallelism over torch.distributed: one process per device, started by torchrun or
`accelerate launch` (both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

Work is dealt out in blocks, usually one batch each: block j goes to rank j % size. Each rank then
runs exactly the batches one process would run (same padding, so the same numbers), long and short
batches of a length-sorted list spread evenly, and `unshard` restores the input order. The trainer's
micro-batches follow the same rule: rank r runs micro-batches a = r (mod size) of each step.
Extraction sums are all-reduced in float64, so every rank ends with the same directions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from harc.errors import HarcError
from harc.memplan import GIB, Dims, Plan, plan, smallest_fsdp

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, size: int, block: int = 1) -> list[T]:
    """Rank `rank`'s share of `items`: blocks of `block` consecutive items, block j to rank j % size."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [x for j in range(rank, -(-len(items) // block), size)
            for x in items[j * block: (j + 1) * block]]


def unshard(parts: Sequence[Sequence[T]], block: int = 1) -> list[T]:
    """Inverse of `shard`: parts[r] is rank r's share; returns the items in input order."""
    size = len(parts)
    pieces = [[p[i: i + block] for i in range(0, len(p), block)] for p in parts]
    out: list[T] = []
    for j in range(sum(len(p) for p in pieces)):
        out.extend(pieces[j % size][j // size])
    return out


def check_device_types(types: Sequence[str]) -> None:
    """All ranks must compute on one kind of device: NCCL and gloo ranks cannot talk."""
    kinds = sorted(set(types))
    if len(kinds) > 1:
        where = ", ".join(f"rank {r}: {t}" for r, t in enumerate(types))
        raise HarcError(f"ranks use different device types ({where}); give every process the same "
                        "kind of device (check CUDA_VISIBLE_DEVICES on each node)")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; World() is the single-process, no-op world."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # close() destroys the process group only if this world made it

    @classmethod
    def from_env(cls, device: str | torch.device | None = None,
                 timeout: timedelta = timedelta(minutes=10)) -> World:
        """The world torchrun / accelerate describe in the environment (a single process without
        WORLD_SIZE); joins the process group, or adopts one that is already initialised.

        Device: `device` if given, else cuda:LOCAL_RANK where CUDA is available, else the CPU.
        Backend: NCCL for CUDA, gloo otherwise. Before the group starts, the ranks compare their
        device types through the rendezvous store, so a mixed set fails at once, not in a hang."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1"))
        local = int(env.get("LOCAL_RANK", "0"))
        dev = _pick_device(local, device)
        if size <= 1:
            return cls(device=dev)
        if "RANK" not in env:
            raise HarcError("WORLD_SIZE is set but RANK is not; start the processes with torchrun "
                            "or accelerate launch")
        if dist.is_initialized():  # e.g. accelerate's PartialState made it
            world = cls(dist.get_rank(), dist.get_world_size(), local, dev)
            check_device_types(world.all_gather_object(dev.type))
            return world
        store, rank, size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
        tag = dist.PrefixStore(f"harc/{attempt}/device", store)
        tag.set(str(rank), dev.type)
        tag.wait([str(r) for r in range(size)], timeout)
        check_device_types([tag.get(str(r)).decode() for r in range(size)])
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=size, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
        return cls(rank, size, local, dev, owns_group=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ---- work split
    def shard(self, items: Sequence[T], block: int = 1) -> list[T]:
        return shard(items, self.rank, self.size, block)

    def gather(self, local: Sequence[T], block: int = 1, dst: int | None = None) -> list[T] | None:
        """Every rank's `shard` back in input order: on every rank, or only on `dst` (None elsewhere)."""
        if self.size == 1:
            return list(local)
        if dst is None:
            return unshard(self.all_gather_object(list(local)), block)
        parts = [None] * self.size if self.rank == dst else None
        dist.gather_object(list(local), parts, dst=dst)
        return unshard(parts, block) if self.rank == dst else None

    def check_grad_accum(self, grad_accum: int) -> None:
        """Each rank runs grad_accum / size whole micro-batches of every optimizer step."""
        if grad_accum % self.size:
            raise HarcError(
                f"{self.size} processes cannot share grad_accum={grad_accum} micro-batches evenly; "
                f"set grad_accum to a multiple of {self.size} (the effective batch grows with it) "
                f"or start {_divisors(grad_accum)} processes")

    def micro_batches(self, step: int, grad_accum: int) -> list[int]:
        """Global indices of this rank's micro-batches in optimizer step `step`. Scale each backward
        by 1 / len(result): DDP then averages over ranks to the single-process sum / grad_accum."""
        self.check_grad_accum(grad_accum)
        return [step * grad_accum + a for a in range(self.rank, grad_accum, self.size)]

    # ---- collectives (no-ops in a single process)
    def all_gather_object(self, obj: T) -> list[T]:
        if self.size == 1:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T, src: int = 0) -> T:
        """`obj` as rank `src` has it, on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Element-wise sums over ranks, in float64 (one collective for the whole dict); each result
        comes back on its input's device. Every rank receives the same bits."""
        if self.size == 1:
            return {k: v.double() for k, v in tensors.items()}
        keys = sorted(tensors)
        flat = torch.cat([tensors[k].detach().reshape(-1).to(self.device, torch.float64)
                          for k in keys])
        dist.all_reduce(flat)
        out, i = {}, 0
        for k in keys:
            v = tensors[k]
            out[k] = flat[i: i + v.numel()].view(v.shape).to(v.device)
            i += v.numel()
        return out

    def all_ranks_agree(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank (the non-finite step guard: skip together)."""
        if self.size == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


# ---- start-up check against the memory plan

def check_memory(world: World, strategy: str, model_config, *, capacity_gib: float | None = None,
                 gradient_checkpointing: bool = False, compiled: bool = False, **plan_kw: Any
                 ) -> Plan | None:
    """Refuse, before any weight is loaded, a setup whose computed per-GPU peak (harc.memplan)
    exceeds the device memory; returns the plan. `strategy`: "ddp" or "fsdp2". Capacity: the
    device's total memory on CUDA; on other devices only when given (else nothing is checked)."""
    if capacity_gib is None:
        if world.device.type != "cuda":
            return None
        capacity_gib = torch.cuda.get_device_properties(world.device).total_memory / GIB
    dims = Dims.from_config(model_config)
    kind = strategy if world.size > 1 else "single"
    p = plan(dims, kind, world.size, **plan_kw)
    need = p.peak(gradient_checkpointing, compiled)
    if need <= capacity_gib:
        return p
    what = {"single": "one GPU", "ddp": f"DDP over {world.size} GPUs",
            "fsdp2": f"FSDP2 over {world.size} GPUs"}[kind]
    act = need - p.weights - p.weights_in_flight - p.lora - p.ddp_buckets
    fixes = []
    if not gradient_checkpointing and p.peak(True) <= capacity_gib:
        fixes.append("set gradient_checkpointing: true")
    for ckpt in (gradient_checkpointing, True):
        n = smallest_fsdp(dims, capacity_gib, checkpointing=ckpt, compiled=compiled, **plan_kw)
        if not fixes and n is not None and (kind != "fsdp2" or n > world.size):
            with_ckpt = " with gradient_checkpointing: true" if ckpt > gradient_checkpointing else ""
            fixes.append(f"use FSDP2 over {n} GPUs{with_ckpt}")
    raise HarcError(
        f"{dims.name} on {what} needs about {need:.0f} GiB per GPU (computed: weights "
        f"{p.weights + p.weights_in_flight:.0f}, LoRA state {p.lora + p.ddp_buckets:.1f}, "
        f"activations {act:.0f}), more than the {capacity_gib:.0f} GiB each has; "
        + (" or ".join(fixes) if fixes else "shorten the rows (max_prompt_tokens, "
           "max_response_tokens)"))


def _pick_device(local_rank: int, device) -> torch.device:
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type != "cuda":
        return dev
    index = local_rank if dev.index is None else dev.index
    n = torch.cuda.device_count()
    if index >= n:
        raise HarcError(f"LOCAL_RANK {local_rank} asks for CUDA device {index} but this node has "
                        f"{n}; start at most {n} processes per node")
    torch.cuda.set_device(index)  # NCCL's object collectives use the current device
    return torch.device("cuda", index)


def _divisors(n: int) -> str:
    return " or ".join(str(k) for k in range(1, n + 1) if n % k == 0)
