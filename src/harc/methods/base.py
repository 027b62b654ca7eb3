"""A training method is one config class and one `Method` subclass over the shared `Trainer`.

The trainer owns everything generic (data order, LoRA, optimizer and schedule, accumulation,
non-finite steps, logging, checkpoints and exact resume); the method owns its loss and any state
of its own (e.g. HARC's directions and selected layers), which it saves into checkpoints.

    @register_method
    class MyMethod(Method):
        name = "mine"
        Config = MyConfig          # a TrainConfig subclass with the method's keys
        terms = ("ce", "kl")
        def micro_step(self, mb, scale): ...   # forward, backward(scale), detached terms
        def loss(self, mb): ...                # optional: multi-process training (see below)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from harc.chat import ChatFormat
from harc.distributed import World
from harc.methods.batching import Example, MicroBatch, encode_example
from harc.methods.config import TrainConfig
from harc.methods.step import KLCache
from harc.registry import Registry


class Method:
    """Base class of training methods; subclasses set `name`, `Config`, `terms`, `micro_step`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TrainConfig]] = TrainConfig
    terms: ClassVar[tuple[str, ...]] = ()
    # Fields every harmful training record must have (the texts the method trains on).
    harmful_fields: ClassVar[tuple[str, ...]] = ("prompt", "refusal")
    # The processes training together; the trainer sets it after __init__. Work between optimizer
    # steps (extraction, checks) runs on every rank and may split its batches over them.
    world: World = World()
    # The base model's KL reference per retain row (`kl_cache: true`); the trainer sets it.
    kl_cache: KLCache | None = None

    def __init__(self, cfg: TrainConfig, model, chat: ChatFormat, data: Mapping[str, Sequence], *,
                 directions=None):
        """Runs before the adapter is attached: `model` is the base model here; the trainer
        sets `self.model` to the adapted model afterwards."""
        self.cfg, self.model, self.chat, self.data = cfg, model, chat, data

    @classmethod
    def needs_extraction_sets(cls, cfg: TrainConfig, directions) -> bool:
        """Whether training needs response-side extraction pairs (HARC extracts directions)."""
        return False

    @classmethod
    def prepare_data(cls, cfg: TrainConfig, model, chat: ChatFormat,
                     data: Mapping[str, Sequence]) -> dict:
        """The split training data with any rows the method adds (made with the base `model`);
        runs before the rows are encoded. `data["exclude"]`, when given, lists prompts that
        nothing added may come near (the evaluation prompts)."""
        return dict(data)

    @classmethod
    def encode(cls, cfg: TrainConfig, chat: ChatFormat, rec: Mapping, kind: int) -> Example:
        return encode_example(chat, rec, kind, getattr(cfg, "n_resp_tokens", 32))

    def weights(self) -> dict[str, float]:
        """Weight of each term in the total loss."""
        return {t: 1.0 for t in self.terms}

    def micro_step(self, mb: MicroBatch, scale: float
                   ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward and backward (loss x `scale`) of one micro-batch. Returns the detached terms
        and [L, B] per-row statistics that the log averages per category (may be empty)."""
        raise NotImplementedError

    def loss(self, mb: MicroBatch
             ) -> AbstractContextManager[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
        """The forward alone, for multi-process training (DDP and FSDP2 must see the forward end
        before they run the backward): a context manager yielding the weighted total loss (with
        grad), the detached terms and the [L, B] statistics of `micro_step`. The trainer runs the
        backward inside the with-block, so hooks the forward needs may stay in place until then.
        A method without it trains in one process only."""
        raise NotImplementedError

    def log_fields(self) -> dict[str, Any]:
        """Extra fields of every step's log record (e.g. the coupled layers)."""
        return {}

    def on_start(self, out: Path) -> dict[str, Any]:
        """Write starting artifacts into `out`; fields of the "start" log record."""
        return {}

    def after_step(self, step: int, last: bool, status: Callable[[str], None]) -> list[dict]:
        """Log records of work done between optimizer steps (e.g. a direction refresh)."""
        return []

    def on_end(self, out: Path) -> dict[str, Any]:
        """Write final artifacts into `out`; fields of the "end" log record."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON state kept in checkpoints (tensors go through `save`)."""
        return {}

    def save(self, folder: Path) -> None:
        """Write the method's tensors into a checkpoint folder."""

    def load(self, folder: Path, state: Mapping[str, Any]) -> None:
        """Restore what `state` and `save` kept."""

    def adapter_meta(self) -> dict[str, Any]:
        """Fields recorded in harc_adapter.json beside the adapter."""
        return {}


METHODS: Registry[Method] = Registry(
    "method", Method, group="harc.methods",
    builtins=[f"harc.methods.{m}" for m in ("harc", "sft", "dpo", "circuit_breakers")])


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make a `Method` subclass available as `method: <cls.name>`."""
    return METHODS.register(cls)
