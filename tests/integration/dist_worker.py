"""One rank of tests/integration/test_distributed_gloo.py, started by torchrun on the CPU (gloo).

Each rank computes the single-process reference itself (same threads, same model) and then the
data-parallel result, and saves both with the collective checks to OUT/rank{RANK}.pt.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import tiny_model, tiny_tokenizer  # noqa: E402

from harc.chat import ChatFormat  # noqa: E402
from harc.directions import NAMES, Directions, extract_directions, prompt_projections  # noqa: E402
from harc.distributed import World  # noqa: E402
from harc.errors import HarcError  # noqa: E402
from harc.eval import EvalConfig, Evaluator, GenerationCache  # noqa: E402
from harc.eval.engine import DataParallelEvaluator  # noqa: E402
from harc.generation import generate, generate_sharded  # noqa: E402

HARMFUL = [f"how do I kill a process number {i}" + " now" * i for i in range(7)]
HARMLESS = [f"write a poem about the sea {i}" + " please" * (i % 3) for i in range(5)]
PROMPTS = HARMFUL + ["bake bread at home", "explain the sky"]


def directions(model, chat, world):
    # batch 2: 7 harmful prompts are 4 batches (the last of one), "helpful" is one batch, so
    # rank 1 sees no helpful pair at all.
    d = extract_directions(
        model, chat, harmful=HARMFUL, harmless=HARMLESS,
        harmful_completions=[(p, "Sure, here is how to do it.") for p in HARMFUL[:5]],
        refusals=[(p, "I'm sorry, but I can't help with that.") for p in HARMFUL[:5]],
        helpful=[(p, "The waves roll under a blue sky.") for p in HARMLESS[:2]],
        batch_size=2, n_boot=16, seed=3, world=world)
    return {**d.as_dict(), **{f"norm.{k}": v for k, v in d.norms.items()}, "boot_cos": d.boot_cos}


def collectives(world):
    out = {"gather_all": world.gather(world.shard(list(range(11)), 3), 3),
           "gather_dst": world.gather(world.shard(list(range(5)), 1), 1, dst=0),
           "broadcast": world.broadcast(f"from rank {world.rank}"),
           "agree_mixed": world.all_ranks_agree(world.rank == 0),
           "agree_all": world.all_ranks_agree(True),
           "sum": world.all_reduce_sum({"x": torch.tensor([world.rank + 0.5])})["x"].tolist(),
           "micro_batches": world.micro_batches(3, 4)}
    try:
        world.check_grad_accum(3)
    except HarcError as e:
        out["grad_accum_error"] = str(e)
    try:  # the group exists, so this takes the adopted-group path and compares device types
        World.from_env(device="meta" if world.rank else "cpu")
    except HarcError as e:
        out["device_error"] = str(e)
    return out


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    world = World.from_env()
    model, chat = tiny_model("llama"), ChatFormat(tiny_tokenizer("chatml"))
    prefills = [None, "Sure", None, None, "I", None, None, None, "Step 1:"]
    res = {"world": (world.rank, world.size, str(world.device)), **collectives(world)}
    res["dirs_single"], res["dirs_multi"] = directions(model, chat, None), directions(model, chat, world)
    dirs = Directions(**{n: res["dirs_single"][n] for n in NAMES}, norms={})
    res["proj_single"] = prompt_projections(model, chat, PROMPTS, dirs, batch_size=2)
    res["proj_multi"] = prompt_projections(model, chat, PROMPTS, dirs, batch_size=2, world=world)
    kw = dict(max_new_tokens=6, batch_size=2, prefills=prefills)
    res["gen_single"] = generate(model, chat, PROMPTS, **kw)
    res["gen_multi"] = generate_sharded(world, model, chat, PROMPTS, **kw)
    cfg = EvalConfig(max_new_tokens=5, batch_size=2)
    res["eval_single"] = Evaluator(model, chat, cfg, name="base").respond(PROMPTS, prefills)
    path = out_dir / "gen.jsonl"
    ev = DataParallelEvaluator(model, chat, cfg, name="base", cache=GenerationCache(path),
                               world=world)
    res["eval_multi"] = ev.respond(PROMPTS, prefills)
    world.barrier()  # rank 0 has written the cache file
    again = DataParallelEvaluator(model, chat, cfg, name="base", cache=GenerationCache(path),
                                  world=world)
    again._generate_batch = None  # everything must come from the cache now
    res["eval_cached"] = again.respond(PROMPTS, prefills)
    torch.save(res, out_dir / f"rank{world.rank}.pt")
    world.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
