"""The shared trainer engine: every method trains through it.

Against the reference's defects (HARC-METHOD §6): one copy of the base weights (the KL reference is
the same model with the adapter disabled), logits only where a loss reads them, length-aware
batching, exact resume from checkpoints, and isolated non-finite steps dropped instead of ending a
long run. A method (`harc.methods.base.Method`) supplies the loss and its own state.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from harc._version import __version__
from harc.chat import ChatFormat
from harc.config import to_dict
from harc.distributed import World
from harc.errors import HarcError
from harc.io import append_line, atomic_dir, atomic_write_json, atomic_write_text, remove_stale_temps
from harc.lora import attach_lora, make_portable
from harc.methods.base import METHODS, Method
from harc.methods.batching import MicroBatchSampler, collate
from harc.methods.checkpoint import (
    DamagedCheckpoint,
    checkpoint_candidates,
    load_optimizer,
    load_rng,
    read_checkpoint,
    save_optimizer,
    save_rng,
    seed_all,
)
from harc.methods.config import KINDS, TrainConfig
from harc.methods.data import split_data
from harc.methods.parallel import Parallel
from harc.methods.step import KLCache, compiled_blocks, set_checkpointing
from harc.models import model_fingerprint, model_identity, unwrap


class Trainer:
    """Trains a LoRA adapter on `model` (a transformers causal LM, or a PeftModel) with the
    method `config.method`.

    data: {"harmful": [{"prompt","refusal","completion"?}], "harmless": [{"prompt","response"}],
    "pseudo": [...]?, "extract_harmful"?, "extract_harmless"?, "val_harmful"?, "val_harmless"?}.
    directions: base directions for methods that use them (else `config.directions`, else
    extracted from the base model).
    world, strategy: train in several processes (`harc.methods.parallel`): every rank builds its
    Trainer alike and calls `train()`; rank 0 logs and writes.
    """

    def __init__(self, config: TrainConfig, model, tokenizer, data: Mapping[str, Sequence], *,
                 directions=None, progress: bool = False, world: World | None = None,
                 strategy: str = "ddp"):
        self.cfg = cfg = config
        self.world = world or World()
        self.world.check_grad_accum(cfg.grad_accum)
        if cfg.kl_cache and strategy == "fsdp" and self.world.size > 1:
            raise HarcError("kl_cache does not work under --strategy fsdp (every forward there is "
                            "a collective that all ranks must run); set kl_cache=false")
        self.progress = progress and self.world.is_main
        self.out = Path(cfg.output_dir)
        method_cls: type[Method] = METHODS.get(cfg.method)
        if not isinstance(cfg, method_cls.Config):
            raise HarcError(f"method {cfg.method!r} needs a {method_cls.Config.__name__}, "
                            f"got a {type(cfg).__name__}")
        seed_all(cfg.seed)
        self.chat = ChatFormat(tokenizer, system_prompt=cfg.system_prompt,
                               raw_template=cfg.raw_template,
                               max_prompt_tokens=cfg.max_prompt_tokens,
                               max_response_tokens=cfg.max_response_tokens)
        self.data = split_data(cfg, data, harmful_fields=method_cls.harmful_fields,
                               need_extraction=method_cls.needs_extraction_sets(cfg, directions))
        self.data = method_cls.prepare_data(cfg, model, self.chat, self.data)
        for k in KINDS:
            if getattr(cfg.batch, k) and not self.data.get(k):
                raise HarcError(f"batch.{k}={getattr(cfg.batch, k)} but data.{k} is empty")
        examples = {k: [method_cls.encode(cfg, self.chat, r, i) for r in self.data.get(k, [])]
                    for i, k in enumerate(KINDS)}
        self.sampler = MicroBatchSampler(cfg, examples)
        self.method = method_cls(cfg, model, self.chat, self.data, directions=directions)
        if isinstance(model, PeftModel):
            self.model = model
        else:
            # Seeded just before the LoRA init, so the adapter starts the same in every run.
            torch.manual_seed(cfg.seed)
            self.model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha,
                                     dropout=cfg.lora.dropout, target_modules=cfg.lora.targets)
        self.method.model, self.method.world = self.model, self.world
        if cfg.kl_cache:
            self.method.kl_cache = KLCache()
        # Fixed before FSDP2 shards the weights (a sharded parameter cannot be read on one rank).
        unwrap(self.model).harc_fingerprint = model_fingerprint(self.model)
        self.parallel = Parallel(self.world, strategy, self.model, self.method)  # FSDP2: shards
        self.device = next(self.model.parameters()).device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise HarcError("the model has no trainable (adapter) parameters")
        set_checkpointing(self.model, cfg.gradient_checkpointing)
        unwrap(self.model).config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.step = 0
        self.skipped = 0  # non-finite optimizer steps dropped so far

    # ---- one optimizer step
    def _optimizer_step(self) -> dict | None:
        """One optimizer step; its log record, or None when it was dropped as non-finite."""
        c = self.cfg
        t0 = time.perf_counter()
        self.model.train()
        sums = {k: torch.zeros((), device=self.device) for k in self.method.terms}
        stat_sum: dict[str, Tensor] = {}
        counts = torch.zeros(2, device=self.device)
        tokens = padded = 0
        mine = self.world.micro_batches(self.step, c.grad_accum)  # all of them in one process
        for j, index in enumerate(mine):
            exs = self.sampler(index)
            mb = collate(exs, self.chat.tail_len, self.chat.tokenizer.pad_token_id,
                         c.pad_multiple).to(self.device)
            terms, stats = self.parallel.micro_step(mb, 1.0 / len(mine), last=j == len(mine) - 1)
            for k, v in terms.items():
                sums[k] += v / c.grad_accum
            # Per-row statistics: per category (harmful / retain) and layer, summed over rows.
            masks = torch.stack([mb.is_harmful, ~mb.is_harmful]).float()  # [2, B]
            counts += masks.sum(1)
            for k, v in stats.items():
                s = torch.einsum("lb,cb->cl", v.detach().float(), masks)
                stat_sum[k] = stat_sum.get(k, 0) + s
            tokens += mb.n_real
            padded += mb.n_padded
        sums, stat_sum, counts, tokens, padded = self._reduce(sums, stat_sum, counts, tokens, padded)
        grad_norm = self.parallel.clip_grad_norm(
            self.params, c.max_grad_norm if c.max_grad_norm else float("inf"))
        vals = {k: float(v) for k, v in sums.items()}  # one sync per optimizer step
        vals["grad_norm"] = float(grad_norm)
        bad = [k for k, v in vals.items() if not math.isfinite(v)]
        if not self.world.all_ranks_agree(not bad):
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite(bad, vals)
            self.scheduler.step()  # keeps the step -> lr schedule
            return None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        w = self.method.weights()
        loss = sum(w[k] * vals[k] for k in w)
        cnt = counts.clamp(min=1).cpu()
        stat_rec = {}
        for k, s in stat_sum.items():
            m = (s.cpu() / cnt[:, None])
            stat_rec[k] = {"harmful": [round(x, 5) for x in m[0].tolist()],
                           "retain": [round(x, 5) for x in m[1].tolist()]}
        return {"step": self.step + 1, "lr": lr, "loss": loss, **vals, **self.method.log_fields(),
                "proj": stat_rec, "tokens": tokens, "padded_tokens": padded,
                "tokens_per_s": tokens / dt, "step_s": dt}

    def _reduce(self, sums, stat_sum, counts, tokens, padded):
        """The step's logged sums over all ranks (unchanged in one process)."""
        if self.world.size == 1:
            return sums, stat_sum, counts, tokens, padded
        r = self.parallel.reduce({
            **{f"t/{k}": v for k, v in sums.items()}, **{f"s/{k}": v for k, v in stat_sum.items()},
            "counts": counts, "tokens": torch.tensor(float(tokens)),
            "padded": torch.tensor(float(padded))})
        return ({k: r[f"t/{k}"] for k in sums}, {k: r[f"s/{k}"] for k in stat_sum}, r["counts"],
                int(r["tokens"]), int(r["padded"]))

    def _nonfinite(self, bad: list[str], vals: dict) -> None:
        # An isolated non-finite gradient happens in long bf16 runs (one in 1,642 steps of the
        # replication, every loss finite): drop that update; repeated ones mean divergence.
        self.skipped += 1
        stop = self.skipped > self.cfg.skip_nonfinite
        self._log({"event": "nonfinite", "step": self.step + 1, "terms": bad,
                   "skipped": self.skipped, "stopped": stop, **vals})
        if not stop:
            return
        ckpt = self.latest_checkpoint()
        where = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise HarcError(
            f"non-finite {', '.join(bad)} at step {self.step + 1} (non-finite step "
            f"{self.skipped}, skip_nonfinite={self.cfg.skip_nonfinite}); training stopped without "
            f"applying it; {where}. Lower lr, raise warmup_steps or set max_grad_norm")

    # ---- the loop
    def train(self) -> Path:
        """Train to `config.steps` (resuming if asked); returns the final adapter folder."""
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world.is_main:  # temporaries of writes an interruption cut short (never read)
            remove_stale_temps(self.out)
            remove_stale_temps(self.ckpt_dir)
        self._maybe_resume()
        if self.step == 0:
            if self.world.is_main:
                self.log_path.unlink(missing_ok=True)  # of a run that died before its 1st checkpoint
                atomic_write_json(self.out / "config.json", to_dict(c))
            self._log({"event": "start", "step": 0, "method": c.method,
                       "trainable_params": sum(p.numel() for p in self.params),
                       **self._hook(self.method.on_start, out=self.out), "harc_version": __version__})
        bar = self._progress()
        name = c.method.upper() if len(c.method) <= 4 else c.method
        task = bar.add_task(name, total=c.steps, completed=self.step, loss=float("nan"), tps=0.0)

        def status(what: str) -> None:
            bar.update(task, description=f"{name} ({what})" if what else name)

        with bar, compiled_blocks(self.model, c.compile):
            while self.step < c.steps:
                rec = self._optimizer_step()
                self.step += 1
                if rec is None:  # dropped (non-finite); the data order moves on regardless
                    bar.update(task, completed=self.step)
                else:
                    self._log(rec)
                    bar.update(task, completed=self.step, loss=rec["loss"],
                               tps=rec["tokens_per_s"])
                for r in self._hook(self.method.after_step, self.step, self.step >= c.steps, status):
                    self._log(r)
                if self.step == c.steps or (c.checkpoint_every and
                                            self.step % c.checkpoint_every == 0):
                    self.save_checkpoint()
        final = self.save_adapter(self.out / "adapter")
        self._log({"event": "end", "step": self.step, **self._hook(self.method.on_end, out=self.out)})
        self.world.barrier()  # every rank returns once rank 0 has written
        return final

    def _hook(self, fn, *args, out: Path | None = None):
        """A method's hook, on every rank (its forwards and collectives need them all). Files come
        from rank 0: the other ranks write into a scratch `out` folder, dropped afterwards."""
        if out is None or self.world.is_main:
            return self.parallel.run(fn, *args, *([out] if out else []))
        with tempfile.TemporaryDirectory() as scratch:
            return self.parallel.run(fn, Path(scratch))

    def _progress(self):
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"),
                        TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                        TimeRemainingColumn(), disable=not self.progress, transient=False)

    # ---- logging
    @property
    def log_path(self) -> Path:
        return self.out / "log.jsonl"

    def _log(self, rec: dict) -> None:
        if not self.world.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        append_line(self.log_path, json.dumps(rec, default=float))

    # ---- checkpoints
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        found = checkpoint_candidates(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        return found[0] if found else None

    def save_adapter(self, target: Path, snap=None) -> Path:
        """The PEFT adapter plus harc_adapter.json (base identity, method state, config),
        atomically. Every rank calls it (or passes rank 0 its `Parallel.snapshot`); rank 0 writes."""
        snap = snap or self.parallel.snapshot()
        if snap is not None:
            with atomic_dir(target) as tmp:
                self._write_adapter(tmp, snap)
        return target

    def _write_adapter(self, folder: Path, snap) -> None:
        self.model.save_pretrained(str(folder), safe_serialization=True, **snap.save_kwargs)
        make_portable(folder, model_identity(self.model)["model"])
        (folder / "harc_adapter.json").write_text(json.dumps(
            {**model_identity(self.model), "harc_version": __version__, "step": self.step,
             "method": self.cfg.method, **self.method.adapter_meta(),
             "config": to_dict(self.cfg)}, indent=2, default=str))

    def save_checkpoint(self) -> Path:
        """Adapter, optimizer, scheduler, RNG, step and the method's state, written as one folder
        that appears atomically; then the `latest` pointer moves and old checkpoints are pruned.
        Every rank calls it; rank 0 writes."""
        name = f"step-{self.step:07d}"
        snap = self.parallel.snapshot(self.optimizer)
        if snap is None:
            return self.ckpt_dir / name
        target = self.ckpt_dir / name
        with atomic_dir(target) as tmp:
            (tmp / "adapter").mkdir()
            self._write_adapter(tmp / "adapter", snap)
            opt = save_optimizer(snap.optimizer, tmp / "optimizer.safetensors")
            py_rng = save_rng(tmp / "rng.safetensors")
            self.method.save(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps({
                "step": self.step, "skipped": self.skipped, "method": self.method.state(),
                **opt, "scheduler": self.scheduler.state_dict(), "python_rng": py_rng,
                "config": to_dict(self.cfg), "harc_version": __version__,
            }, default=str))
        atomic_write_text(self.ckpt_dir / "latest", name)
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if p.is_dir())
        for old in done[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _maybe_resume(self) -> None:
        c = self.cfg
        if c.resume == "never":
            if self.latest_checkpoint():
                raise HarcError(f"{self.out} already holds checkpoints; choose another "
                                "output_dir, or set resume=auto to continue that run")
            return
        if c.resume != "auto":
            self.load_checkpoint(Path(c.resume))
            return
        found = checkpoint_candidates(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
        self.parallel.same_on_every_rank(found and found[0].name, "checkpoints")
        damaged = []
        for path in found:
            try:
                self.load_checkpoint(path)
            except DamagedCheckpoint as e:  # a crash mid-write: the previous one is intact
                damaged.append(str(e))
                print(f"harc: {e}; trying the previous checkpoint", file=sys.stderr)
                continue
            if damaged:
                self._log({"event": "damaged_checkpoints", "step": self.step, "skipped": damaged})
            return
        if damaged:
            raise HarcError(f"no intact checkpoint in {self.ckpt_dir} ({len(damaged)} damaged); "
                            "delete that folder to train from the start")

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly.
        Raises DamagedCheckpoint, before restoring anything, if a file cannot be read."""
        ck = read_checkpoint(Path(path))
        st = ck.state
        mine, theirs = to_dict(self.cfg), st.get("config", {})
        free = type(self.cfg).resume_free
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in free and mine.get(k) != theirs.get(k))
        if diff:
            raise HarcError(f"cannot resume from {path}: config keys changed since: {diff}; "
                            "restore them or start a new output_dir")
        result = self.parallel.load_adapter(ck.adapter)
        if getattr(result, "unexpected_keys", None):
            raise HarcError(f"checkpoint adapter does not fit this model: {result.unexpected_keys[:3]}")
        try:
            load_optimizer(self.parallel.loadable(self.optimizer), ck.optimizer, st, self.device)
            self.scheduler.load_state_dict(st["scheduler"])
            load_rng(ck.rng, st["python_rng"])
            self.method.load(ck.path, st["method"])
        except (KeyError, ValueError, RuntimeError, OSError, HarcError) as e:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged ({type(e).__name__}: "
                                    f"{str(e)[:120]})") from None
        self.step = int(st["step"])
        self.skipped = int(st.get("skipped", 0))
        # Drop log records from after the checkpoint (written before the interruption) and a
        # last line an interruption cut short.
        if self.log_path.is_file() and self.world.is_main:
            keep = []
            for line in self.log_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= self.step and rec.get("event") != "end":
                    keep.append(line)
            atomic_write_text(self.log_path, "".join(x + "\n" for x in keep))
        self._log({"event": "resume", "step": self.step, "checkpoint": str(path)})
