"""Settings shared by every training method (the trl pattern: one base config, one subclass per
method that adds its own keys). YAML keys are the field names, nested with dots on the command
line (`lora.r=16`); `harc.config` turns every problem into one line that names the key."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field

from harc.config import Config
from harc.errors import HarcError
from harc.models import DEFAULT_TARGET_MODULES

KINDS = ("harmful", "harmless", "pseudo")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv")


class LoraSettings(Config):
    """LoRA adapter shape (§5: r 32, alpha 64, dropout 0 on all seven projections).

    r: rank. alpha: scaling numerator (scale = alpha / r). dropout: LoRA dropout probability.
    targets: names of the linear modules that get an adapter.
    """

    prefix: ClassVar[str] = "lora."

    r: int = 32
    alpha: int = 64
    dropout: float = 0.0
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def check(self) -> None:
        self.need(self.r > 0, "r", "must be positive")
        self.need(self.alpha > 0, "alpha", "must be positive")
        self.need(0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")
        self.need(len(self.targets) > 0, "targets", "must name at least one module")


class BatchSizes(Config):
    """Rows per micro-batch from each category (§5: 6 harmful + 4 harmless + 2 pseudo).

    harmful: harmful-prompt rows (their target comes from the method: the refusal for HARC).
    harmless / pseudo: prompt + answer rows (KL retain); pseudo = harmless prompts that look
    harmful.
    """

    prefix: ClassVar[str] = "batch."

    harmful: int = 6
    harmless: int = 4
    pseudo: int = 2

    def check(self) -> None:
        for k in KINDS:
            self.need(getattr(self, k) >= 0, k, "must be >= 0")
        self.need(self.harmful + self.harmless + self.pseudo > 0, "harmful",
                  "a micro-batch needs at least one row")


class DataSettings(Config):
    """Where the data comes from: each entry is a registry name (resolved by `harc.data.load`) or a
    path to a data file (relative paths: from the working directory, else from the config's folder).

    harmful: records {"prompt", "refusal", "completion"?}; the refusal is the CE target.
    harmless: records {"prompt", "response"} (KL retain). pseudo: pseudo-harmful {"prompt",
    "response"} (KL retain); null for none. extract_harmful: triples {"prompt", "refusal",
    "completion"} for direction extraction (default: `harmful`). extract_harmless: pairs for
    extraction (default: `harmless`). These two may hold prompts only (e.g. AdvBench + Alpaca, the
    Qwen reference): then the response-side directions use the first `extract_n` training records.
    val_harmful / val_harmless: prompts for the held-out projection check (default: held out from
    the extraction sets, and removed from training).
    extract_n: examples per extraction set (§2: 300). val_n: held-out prompts per side (§2: 100).
    harmful_n / harmless_n / pseudo_n: use only the first N training records (null: all; §5 uses
    5,000 UltraChat pairs).
    """

    prefix: ClassVar[str] = "data."

    harmful: str | None = None
    harmless: str | None = None
    pseudo: str | None = None
    extract_harmful: str | None = None
    extract_harmless: str | None = None
    val_harmful: str | None = None
    val_harmless: str | None = None
    extract_n: int = 300
    val_n: int = 100
    harmful_n: int | None = None
    harmless_n: int | None = None
    pseudo_n: int | None = None

    def check(self) -> None:
        self.need(self.extract_n > 0, "extract_n", "must be positive")
        self.need(self.val_n >= 0, "val_n", "must be >= 0")
        for k in KINDS:
            n = getattr(self, f"{k}_n")
            self.need(n is None or n > 0, f"{k}_n", "must be positive or null")


class TrainConfig(Config):
    """Settings of every training method. A method's config subclasses this and adds its keys.

    method: the training method (`harc train --method`, or this key in the YAML file).
    model: built-in name, local folder, .gguf file or hub id (see `harc.models.load_model`).
    dtype: "auto" (bf16 on GPU, float32 on CPU), "bfloat16", "float16" or "float32".
    attn_implementation: transformers attention kernel; "sdpa" by default.
    raw_template: null (the tokenizer's chat template), "qwen", "llama" or a string with "{}"
        (§1 raw-template variant, used for Qwen in the released configs).
    system_prompt: system message rendered before the user turn (chat template only).
    data: see `DataSettings`. lora: see `LoraSettings`. batch: see `BatchSizes`.
    lr: AdamW learning rate (§5: 1e-4). weight_decay: AdamW weight decay (0).
    warmup_steps: linear warm-up from 0 to `lr` over this many optimizer steps, then constant.
    steps: optimizer steps to train (§5: 400 Llama, 2000 Qwen).
    grad_accum: micro-batches per optimizer step (§5: 2, effective batch 24).
    max_grad_norm: clip the gradient norm to this; null: no clipping (the norm is still checked).
    skip_nonfinite: optimizer steps with a non-finite loss or gradient norm that are dropped (update
        not applied, logged) before the run stops at its last good checkpoint; 0: stop at the first.
    max_prompt_tokens / max_response_tokens: truncation (prompt from the left, response right).
    extract_batch_size: batch size of every extraction and held-out check during training.
    seed: seeds Python, torch, the LoRA init and the data order.
    checkpoint_every: write a resumable checkpoint every this many steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    output_dir: run folder (adapter/, checkpoints/, log.jsonl, config.yaml).
    resume: "auto" (continue from the latest checkpoint in output_dir if any), "never" (refuse a
        folder that has checkpoints) or the path of a checkpoint folder.
    gradient_checkpointing: recompute block activations in backward (less memory, ~1/3 more time).
    compile: run the decoder blocks through torch.compile while training (GPU: a one-time compile
        of a minute or two, then about 15% faster steps at 7B scale; see docs/performance.md).
    logits_chunk: response positions per LM-head chunk in KL and CE.
    kl_cache: keep the frozen base model's final hidden states at each retain row's KL positions
        (host memory, keyed by the row's tokens) and skip the reference forward for rows seen
        before. The base never changes during training, so this only removes work: the paper
        configs draw each retain row 3-35 times. Not under FSDP2 (its forwards are collectives).
    bucket_window: micro-batches whose draws are sorted by length together (0: grad_accum).
    pad_multiple: pad each micro-batch's width to a multiple of this (fewer distinct shapes).
    """

    # Keys a checkpoint may be resumed under with another value (they change no result).
    resume_free: ClassVar[frozenset[str]] = frozenset({
        "steps", "checkpoint_every", "keep_checkpoints", "resume", "output_dir",
        "gradient_checkpointing", "logits_chunk", "extract_batch_size", "attn_implementation",
        "pad_multiple", "skip_nonfinite", "kl_cache"})

    method: str = "harc"
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    raw_template: str | None = None
    system_prompt: str | None = None
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    steps: int = 400
    batch: BatchSizes = Field(default_factory=BatchSizes)
    grad_accum: int = 2
    max_grad_norm: float | None = None
    skip_nonfinite: int = 3
    max_prompt_tokens: int = 256
    max_response_tokens: int = 256
    extract_batch_size: int = 16
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    output_dir: str = "runs/harc"
    resume: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    logits_chunk: int = 1024
    kl_cache: bool = False
    bucket_window: int = 0
    pad_multiple: int = 8

    def check(self) -> None:
        need = self.need
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.steps > 0, "steps", "must be a positive number of optimizer steps")
        need(self.lr > 0, "lr", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
             "must be positive or null")
        need(self.skip_nonfinite >= 0, "skip_nonfinite", "must be >= 0")
        need(self.max_prompt_tokens > 0, "max_prompt_tokens", "must be positive")
        need(self.max_response_tokens > 1, "max_response_tokens", "must be > 1 (EOS included)")
        need(self.extract_batch_size > 0, "extract_batch_size", "must be positive")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.logits_chunk > 0, "logits_chunk", "must be positive")
        need(self.bucket_window >= 0, "bucket_window", "must be >= 0")
        need(self.pad_multiple >= 1, "pad_multiple", "must be >= 1")
        need(self.resume in ("auto", "never") or Path(self.resume).is_dir(), "resume",
             "must be 'auto', 'never' or an existing checkpoint folder")

    def require_data(self) -> None:
        """`harc train` needs its training files; `harc run` synthesises what is left out."""
        for key, why in (("harmful", "harmful records (`harc run` synthesises them from the model)"),
                         ("harmless", "harmless pairs")):
            if getattr(self.data, key) is None:
                raise HarcError(f"config key 'data.{key}' is required ({why}) (got None)")
        if self.batch.pseudo and self.data.pseudo is None:
            raise HarcError("config key 'data.pseudo' is required while batch.pseudo > 0 "
                            "(or set batch.pseudo=0) (got None)")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype == "auto" else getattr(torch, self.dtype)
