"""Training in several processes, one per GPU (gloo processes on the CPU), on torch's own engines:
DDP (a full replica per rank) or FSDP2 (`fully_shard` per decoder block: frozen base and LoRA
state sharded over the ranks). The processes come from torchrun, `accelerate launch` or
`harc train --nproc N`, which re-launches itself through `torch.distributed.run`.

Same results as one process: rank r runs micro-batches a = r (mod N) of each optimizer step
(`World.micro_batches`), each backward scaled by 1 / (its micro-batch count); the engines average
the gradients over the ranks, which gives one process's sum / grad_accum. Logged terms, statistics
and token counts are summed over the ranks; the gradient norm is the global one.

Both engines act through a module's forward (DDP prepares its gradient reduction when the forward
returns; the FSDP2 root gathers the parameters outside the decoder blocks), while the methods call
the backbone and the LM head directly. So the whole micro-step runs as the forward of one module
(`_Step`, the root) and the trainer runs the backward after it, inside `Method.loss`'s with-block.
Under FSDP2, every other use of the model (extraction, held-out checks) runs inside that forward
too, on every rank.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harc.distributed import World, check_memory
from harc.errors import HarcError
from harc.methods.base import METHODS, Method
from harc.methods.batching import MicroBatch
from harc.methods.config import TrainConfig
from harc.models import decoder_layers, resolve_model_path

STRATEGIES = ("ddp", "fsdp")


class _Step(nn.Module):
    """Runs `fn(*args)` as its forward: the one module DDP and FSDP2 wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(*args)


@dataclass
class Snapshot:
    """What a checkpoint writes: `adapter` is the full trainable state when the model does not
    hold it whole (FSDP2; else None: the model's own), `optimizer` has torch's `state_dict()`."""

    adapter: dict[str, Tensor] | None
    optimizer: Any

    @property
    def save_kwargs(self) -> dict:
        """Keyword arguments of PEFT's `save_pretrained`."""
        return {} if self.adapter is None else {"state_dict": self.adapter}


class Parallel:
    """How the trainer runs the model: in one process, or DDP / FSDP2 over `world`.

    In one process every call is the plain single-process code (`Method.micro_step` and so on)."""

    def __init__(self, world: World, strategy: str, model, method: Method):
        self.world, self.model, self.method = world, model, method
        self.strategy = strategy if world.size > 1 else None
        if self.strategy is None:
            return
        check_method(type(method))
        step = _Step(model)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Every LoRA parameter gets a gradient in every step; the gradients live in DDP's
            # buckets (no second copy); buffers (rotary tables) are alike on every rank, so no
            # forward re-broadcasts them (torch >= 2.13 renamed the switch).
            buffers = ("forward_sync_buffers" if "forward_sync_buffers" in
                       inspect.signature(DDP).parameters else "broadcast_buffers")
            self.root = DDP(step.to(world.device),
                            device_ids=[world.device] if world.device.type == "cuda" else None,
                            find_unused_parameters=False, gradient_as_bucket_view=True,
                            **{buffers: False})
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # Each block is a unit (its frozen weights and LoRA factors together); the root keeps
            # the embeddings, the final norm and the LM head. fully_shard moves each unit's shard
            # to the rank's device, so the model may come in on the CPU.
            mesh = init_device_mesh(world.device.type, (world.size,))
            for block in decoder_layers(model):
                fully_shard(block, mesh=mesh)
            self.root = fully_shard(step, mesh=mesh)

    # ---- the optimizer step
    def micro_step(self, mb: MicroBatch, scale: float, last: bool
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward and backward (loss x `scale`) of one micro-batch; gradients are averaged over
        the ranks at this rank's `last` micro-batch of the optimizer step."""
        if self.strategy is None:
            return self.method.micro_step(mb, scale)
        if self.strategy == "ddp":
            sync = contextlib.nullcontext() if last else self.root.no_sync()
        else:
            self.root.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext()
        with sync, contextlib.ExitStack() as forward:
            loss, terms, stats = self.root(lambda: forward.enter_context(self.method.loss(mb)))
            if loss.requires_grad:
                (loss * scale).backward()
        return terms, stats

    def reduce(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sums over the ranks (float64, the same bits on every rank); as given in one process."""
        return tensors if self.strategy is None else self.world.all_reduce_sum(tensors)

    def clip_grad_norm(self, params: Sequence[Tensor], max_norm: float) -> Tensor:
        """Clip to `max_norm`; returns the norm of the whole (all ranks') gradient."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor

    def run(self, fn: Callable, *args):
        """`fn(*args)`, work on the model between optimizer steps (extraction, held-out checks).
        Every rank calls it; under FSDP2 it runs as the root's forward, which gathers the
        parameters outside the blocks."""
        return self.root(fn, *args) if self.strategy == "fsdp" else fn(*args)

    # ---- checkpoints
    def snapshot(self, optimizer: torch.optim.Optimizer | None = None) -> Snapshot | None:
        """What rank 0 writes into a checkpoint. Every rank calls it (FSDP2 gathers the trainable
        state to rank 0); the other ranks get None."""
        if self.strategy != "fsdp":
            return Snapshot(None, optimizer) if self.world.is_main else None
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        adapter = get_model_state_dict(self.model, options=_full())
        state = get_optimizer_state_dict(self.model, optimizer, options=_full()) if optimizer \
            else None
        if not self.world.is_main:
            return None
        return Snapshot(adapter, optimizer and _FullOptimizer(self.model, optimizer, state))

    def loadable(self, optimizer: torch.optim.Optimizer):
        """The optimizer as `checkpoint.load_optimizer` loads it (full state, parameter indices):
        under FSDP2 every rank loads the full state and keeps its shard."""
        return _FullOptimizer(self.model, optimizer) if self.strategy == "fsdp" else optimizer

    def load_adapter(self, weights: Mapping[str, Tensor]):
        """Load an adapter file's weights (PEFT names) into the model; returns PEFT's result
        (its `unexpected_keys` name what does not fit)."""
        from peft import set_peft_model_state_dict

        if self.strategy != "fsdp":
            return set_peft_model_state_dict(self.model, weights)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # PEFT's files leave the adapter's name out of each parameter's name.
        tag = f".{self.model.active_adapter}"
        names = {n.replace(tag, ""): n for n, p in self.model.named_parameters() if p.requires_grad}
        unexpected = [k for k in weights if k not in names]
        if not unexpected:
            set_model_state_dict(self.model, {names[k]: v for k, v in weights.items()},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        return _Loaded(unexpected)

    def same_on_every_rank(self, value: Any, what: str) -> Any:
        """`value`, after checking that every rank has it (else a HarcError about `what`)."""
        if self.strategy is None:
            return value
        seen = self.world.all_gather_object(value)
        if any(v != seen[0] for v in seen):
            raise HarcError(f"the ranks see different {what} ({', '.join(map(str, seen))}); put "
                            "output_dir on storage that every rank shares")
        return value


@dataclass
class _Loaded:
    unexpected_keys: list[str]


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class _FullOptimizer:
    """An FSDP2 optimizer as harc's checkpoint code reads and writes it, in the layout of
    `Optimizer.state_dict()` (parameters by index; torch.distributed.checkpoint keys them by name):
    `state_dict()` is what `Parallel.snapshot` gathered, `load_state_dict()` takes a full state."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, by_name: dict | None = None):
        self.model, self.optimizer, self.by_name = model, optimizer, by_name
        name = {id(p): n for n, p in model.named_parameters()}
        self.names = [name[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        index = {n: i for i, n in enumerate(self.names)}
        return {"state": {index[n]: s for n, s in self.by_name["state"].items()},
                "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                 for g in self.by_name["param_groups"]]}

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        n = self.names
        by_name = {"state": {n[int(i)]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [n[i] for i in g["params"]]}
                                    for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, self.optimizer, by_name,
                                 options=StateDictOptions(full_state_dict=True))


# ---- start-up

def check_method(method_cls: type[Method]) -> None:
    """Only a method with `Method.loss` can train in several processes."""
    if method_cls.loss is Method.loss:
        raise HarcError(f"method {method_cls.name!r} cannot train in several processes (it has no "
                        "Method.loss); train it in one process")


def preflight(cfg: TrainConfig, world: World, strategy: str) -> None:
    """The checks of a multi-process run that need no weights, before any model loads (in
    `harc train --nproc` before the processes start, and on every rank): the strategy and method,
    an even split of grad_accum, and on CUDA the computed memory plan (`harc.memplan`) against the
    GPU. Rank 0 fetches the model first (a built-in one is converted once), the others wait."""
    if strategy not in STRATEGIES:
        raise HarcError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if world.size == 1:
        return
    check_method(METHODS.get(cfg.method))
    world.check_grad_accum(cfg.grad_accum)
    if world.device.type != "cuda":
        return
    if strategy == "fsdp" and getattr(cfg, "directions", "") is None:
        raise HarcError("under --strategy fsdp the model is sharded only once training starts "
                        "(it loads on the CPU), so give the base directions: directions=<the "
                        "directions.safetensors of `harc extract`>")
    with _main_first(world):
        path, gguf = resolve_model_path(cfg.model)
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    b = cfg.batch
    rows, retain = b.harmful + b.harmless + b.pseudo, b.harmless + b.pseudo
    check_memory(world, "fsdp2" if strategy == "fsdp" else "ddp", model_cfg,
                 gradient_checkpointing=cfg.gradient_checkpointing, compiled=cfg.compile,
                 r=cfg.lora.r, rows=rows, row_tokens=cfg.max_prompt_tokens + cfg.max_response_tokens,
                 retain_rows=retain, resp_positions=max(retain * cfg.max_response_tokens, 1),
                 couple_layers=max(getattr(cfg, "k_start", 4), getattr(cfg, "k_final", 4)),
                 chunk=cfg.logits_chunk)


@contextlib.contextmanager
def _main_first(world: World):
    """Rank 0 runs the block first, the other ranks after it (once the group exists)."""
    ordered = torch.distributed.is_initialized()
    if ordered and not world.is_main:
        world.barrier()
    yield
    if ordered and world.is_main:
        world.barrier()


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run `harc *args` in `nproc` processes on this machine through torch.distributed.run (one
    per GPU; gloo processes on the CPU); returns the exit code. Each process reports its own
    errors, so the launcher's own logs and traceback are kept quiet."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise HarcError(f"--nproc {nproc} asks for more processes than this machine's "
                        f"{torch.cuda.device_count()} GPUs")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.CRITICAL)
    argv = ["--standalone", "--nproc-per-node", str(nproc), "--module", "harc", *args]
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:  # a process killed by a signal reports a negative code
        return next((f.exitcode for f in e.failures.values() if f.exitcode > 0), 1)
    return 0
