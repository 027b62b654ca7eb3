"""One rank of tests/integration/test_distributed_train.py, started by torchrun on the CPU (gloo).

argv: OUT STRATEGY. Trains the tiny HARC config of `run_config` with STRATEGY ("ddp" or "fsdp")
and is killed (an exception on every rank) in optimizer step 3, half-way through its gradient
accumulation; a fresh trainer then resumes from the step-2 checkpoint and finishes. Rank r saves
what it holds after training to OUT/rank{r}.pt; rank 0 alone writes the run folder OUT/run.
"""

import contextlib
import faulthandler
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402
from train_helpers import make_config, make_data  # noqa: E402

from harc.distributed import World  # noqa: E402
from harc.methods import Trainer  # noqa: E402

# grad_accum 4 over 2 ranks: each rank accumulates 2 micro-batches per step. Refreshes after steps
# 2 (and the checkpoint there), a kill in step 3, then a resume.
CONFIG = dict(grad_accum=4, steps=4, refresh_every=2, checkpoint_every=2, max_grad_norm=1.0)
KILL_AT = 6  # this rank's 6th micro-step: the 2nd of optimizer step 3


def run_config(tmp, **kw):
    return make_config(tmp, **{**CONFIG, **kw})


def trainer(out: Path, world: World, strategy: str) -> Trainer:
    return Trainer(run_config(out), tiny_model("llama"), tiny_tokenizer("chatml"), make_data(),
                   world=world, strategy=strategy)


def nonfinite(out: Path, world: World, strategy: str) -> dict:
    """Rank 1 alone sees a NaN KL in optimizer step 1: every rank must drop that step."""
    tr = Trainer(run_config(out, steps=2, refresh_every=0, checkpoint_every=0, skip_nonfinite=1),
                 tiny_model("llama"), tiny_tokenizer("chatml"), make_data(), world=world,
                 strategy=strategy)
    calls, loss = [0], tr.method.loss

    @contextlib.contextmanager
    def poisoned(mb):
        calls[0] += 1
        with loss(mb) as (total, terms, stats):
            if world.rank == 1 and calls[0] == 1:
                terms = {**terms, "kl": torch.tensor(float("nan"))}
            yield total, terms, stats

    tr.method.loss = poisoned
    tr.train()
    return {"nan_skipped": tr.skipped,
            "nan_adam_steps": sorted({int(s["step"]) for s in tr.optimizer.state.values()})}


def main(out: Path, strategy: str) -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hang fails with every thread's stack
    torch.set_num_threads(1)
    world = World.from_env()
    killed = trainer(out, world, strategy)
    calls, loss = [0], killed.method.loss

    def dying(mb):
        calls[0] += 1
        if calls[0] == KILL_AT:
            raise KeyboardInterrupt
        return loss(mb)

    killed.method.loss = dying
    try:
        killed.train()
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    resumed = trainer(out, world, strategy)
    resumed.train()
    # The whole adapter as this rank sees it (under FSDP2 its shards, gathered: a collective).
    params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
              for n, p in resumed.model.named_parameters() if p.requires_grad}
    torch.save({"killed_at_step": killed.step, "resumed_at_step": resumed.step,
                "layers": resumed.method.layers, "v_ref": resumed.method.dirs.v_ref,
                "params": params, **nonfinite(out / "nan", world, strategy)},
               out / f"rank{world.rank}.pt")
    world.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
