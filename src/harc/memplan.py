"""Computed per-GPU memory of one HARC training micro-step under DDP and FSDP2.

Sizes are GiB (2**30 bytes), as torch.cuda reports its peaks. Per GPU:
- frozen weights, bf16: a full copy (one GPU, DDP); 1/N under FSDP2, plus the unsharded units in
  flight (the current and the prefetched decoder block, and the LM head, which stays gathered
  from its forward to its backward);
- LoRA state: float32 parameters, gradients and AdamW's two moments (16 bytes a parameter), 1/N
  under FSDP2; DDP adds its float32 gradient buckets;
- activations of one micro-batch. Every rank runs whole micro-batches, so N does not shrink them.
  Decoder blocks keep `alpha * block_saved_bytes` a token (all blocks; with gradient
  checkpointing, each block's input plus one recomputed block); the K coupling layers keep a
  float32 copy of their residual for the window mean; the chunked LM head (KL or CE) holds
  `head_bytes` per position and vocabulary entry of one chunk in its backward.
- The KL reference forward (adapter off, retain rows, no autograd) runs before the adapted one,
  so its transient is a separate, smaller peak; it is reported, not added.

alpha (eager and compiled blocks) and head_bytes are fitted on the measured H200 peaks of
`bench/train_step.py --arch qwen2-7b` (CALIBRATION): two equations (with and without
checkpointing) give alpha and head_bytes, the compiled peak gives the compiled alpha.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 2**30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Measured peaks (GiB, torch.cuda.max_memory_allocated) of one micro-step at Qwen2.5-7B scale on
# an NVIDIA H200: docs/bench/train_step-h200-peft-fused.json and -fused-compiled.json (fused
# LoRA, the trainer's default). 12 rows of 416 padded tokens on average (4,992 tokens), K = 4
# coupling layers, logits chunk 1024 (both losses have more positions than that), LoRA r 32 on
# the seven projections; the bench keeps LoRA gradients but no optimizer state.
CALIBRATION = {"rows": 12, "row_tokens": 416, "couple_layers": 4, "chunk": 1024,
               "eager_gib": 47.56, "checkpointed_gib": 18.58, "compiled_gib": 40.64}


@dataclass(frozen=True)
class Dims:
    """The shape of a decoder-only model (Llama / Qwen2 family)."""

    name: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, cfg, name: str | None = None) -> Dims:
        """From a transformers config (Qwen2 configs carry q/k/v biases)."""
        return cls(name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
                   cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                   cfg.vocab_size, bool(getattr(cfg, "tie_word_embeddings", False)),
                   cfg.model_type == "qwen2")

    @property
    def kv(self) -> int:
        return self.hidden // self.n_heads * self.n_kv_heads

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one block."""
        h, kv, i = self.hidden, self.kv, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_params(self) -> int:
        bias = (self.hidden + 2 * self.kv) if self.qkv_bias else 0
        return sum(a * b for a, b in self.shapes().values()) + bias + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.n_layers * self.block_params() + embed * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int = 32, targets=LORA_TARGETS) -> int:
        return self.n_layers * sum(r * (a + b) for n, (a, b) in self.shapes().items()
                                   if n in targets)

    def block_saved_bytes(self) -> int:
        """Bytes a token that one eager bf16 block saves for backward, structurally: two RMSNorms
        (float32 upcast and bf16 output: 3 hidden widths each), q/k/v and the rotated q/k, the
        attention output and o_proj's input, and the MLP's gate, up, SiLU(gate) and product."""
        return 2 * (10 * self.hidden + 3 * self.kv + 4 * self.intermediate)


# Real dimensions, from each model's config.json on the hub.
MODELS = {
    "Llama-3.1-8B": Dims("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256),
    "Qwen2.5-7B": Dims("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, qkv_bias=True),
    "Llama-3.1-70B": Dims("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256),
}


def _static_bench(d: Dims, r: int = 32) -> float:
    """What the calibration bench holds besides activations: bf16 weights, LoRA params + grads."""
    return 2 * d.params() + 8 * d.lora_params(r)


def fit(dims: Dims = MODELS["Qwen2.5-7B"], cal: dict = CALIBRATION) -> dict[str, float]:
    """Solve the activation model for alpha, head_bytes and the compiled alpha on `cal`."""
    tok = cal["rows"] * cal["row_tokens"]
    L, X = dims.n_layers, tok * dims.block_saved_bytes()
    hook = cal["couple_layers"] * tok * dims.hidden * 4
    boundary = L * tok * dims.hidden * 2
    base = _static_bench(dims) + hook
    eager, ckpt, comp = (cal[k] * GIB for k in ("eager_gib", "checkpointed_gib", "compiled_gib"))
    # eager = base + L*alpha*X + H;  ckpt = base + boundary + alpha*X + H
    alpha = (eager - ckpt + boundary) / ((L - 1) * X)
    head = eager - base - L * alpha * X
    return {"alpha": alpha, "alpha_compiled": (comp - base - head) / (L * X),
            "head_bytes": head / (cal["chunk"] * dims.vocab)}


FIT = fit()


@dataclass(frozen=True)
class Plan:
    """Per-GPU GiB of one setup; `peak` = weights + lora + activations (+ ddp buckets)."""

    model: str
    strategy: str  # "single", "ddp" or "fsdp2"
    gpus: int
    weights: float
    weights_in_flight: float
    lora: float
    ddp_buckets: float
    act_eager: float
    act_compiled: float
    act_checkpointed: float
    base_kl_forward: float

    def peak(self, checkpointing: bool = False, compiled: bool = False) -> float:
        act = (self.act_checkpointed if checkpointing
               else self.act_compiled if compiled else self.act_eager)
        return self.weights + self.weights_in_flight + self.lora + self.ddp_buckets + act

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


def plan(d: Dims, strategy: str, gpus: int, *, r: int = 32, rows: int = 12,
         row_tokens: int = 416, retain_rows: int = 6, resp_positions: int = 1024,
         couple_layers: int = 4, chunk: int = 1024) -> Plan:
    """The computed per-GPU memory of `strategy` on `gpus` GPUs (1 GPU: plain, unsharded)."""
    if strategy not in ("single", "ddp", "fsdp2"):
        raise ValueError(f"unknown strategy {strategy!r}")
    shard = gpus if strategy == "fsdp2" else 1
    tok = rows * row_tokens
    L, h, i, V = d.n_layers, d.hidden, d.intermediate, d.vocab
    X = tok * d.block_saved_bytes()
    head = FIT["head_bytes"] * min(chunk, resp_positions) * V
    hook = couple_layers * tok * h * 4
    kl_keep = resp_positions * h * 2  # the base model's last hidden states at KL positions
    common = head + hook + kl_keep
    in_flight = (2 * d.block_params() + V * h) * 2 if strategy == "fsdp2" else 0
    base_tok = retain_rows * row_tokens
    return Plan(
        model=d.name, strategy=strategy, gpus=gpus,
        weights=2 * d.params() / shard / GIB, weights_in_flight=in_flight / GIB,
        lora=16 * d.lora_params(r) / shard / GIB,
        ddp_buckets=4 * d.lora_params(r) / GIB if strategy == "ddp" else 0.0,
        act_eager=(L * FIT["alpha"] * X + common) / GIB,
        act_compiled=(L * FIT["alpha_compiled"] * X + common) / GIB,
        act_checkpointed=(L * tok * h * 2 + FIT["alpha"] * X + common) / GIB,
        # one block's no-grad MLP transient and the retain rows' final hidden states
        base_kl_forward=base_tok * 2 * (3 * i + 2 * h) / GIB,
    )


def smallest_fsdp(d: Dims, capacity_gib: float, *, checkpointing: bool, compiled: bool = False,
                  max_gpus: int = 64, **kw) -> int | None:
    """The fewest GPUs (a power of two) on which FSDP2 fits `capacity_gib`, or None."""
    n = 2
    while n <= max_gpus:
        if plan(d, "fsdp2", n, **kw).peak(checkpointing, compiled) <= capacity_gib:
            return n
        n *= 2
    return None
