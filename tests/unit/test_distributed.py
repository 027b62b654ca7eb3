"""Single-process parts of harc.distributed and harc.memplan: sharding order, the start-up checks,
the micro-batch rule, rank-independent bootstrap weights and the memory model."""

import pytest
import torch
from tiny import tiny_model
from transformers import LlamaConfig

from harc.activations import MeanAccumulator
from harc.distributed import World, check_device_types, check_memory, shard, unshard
from harc.errors import HarcError
from harc.lora import attach_lora
from harc.memplan import CALIBRATION, FIT, GIB, MODELS, Dims, _static_bench, plan

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [1, 2, 5])
def test_shard_then_unshard_restores_input_order(size, block):
    for n in range(0, 14):
        items = [f"x{i}" for i in range(n)]
        parts = [shard(items, r, size, block) for r in range(size)]
        assert sorted(sum(parts, [])) == sorted(items)
        assert unshard(parts, block) == items


def test_each_rank_gets_whole_batches_of_the_single_process():
    items, bs = list(range(11)), 3
    batches = [items[i: i + bs] for i in range(0, len(items), bs)]  # one process's batches
    for rank in range(2):
        mine = shard(items, rank, 2, bs)
        assert [mine[i: i + bs] for i in range(0, len(mine), bs)] == batches[rank::2]


def test_single_process_world_is_a_no_op():
    w = World()
    assert w.is_main and w.shard([1, 2, 3], 2) == [1, 2, 3] and w.gather([1, 2]) == [1, 2]
    assert w.broadcast("a") == "a" and w.all_ranks_agree(False) is False
    assert w.all_reduce_sum({"x": torch.ones(2)})["x"].dtype == torch.float64
    assert w.micro_batches(5, 2) == [10, 11]


def test_from_env_without_a_launcher_is_single_and_rank_is_required(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.from_env().size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(HarcError, match="RANK is not"):
        World.from_env(device="cpu")


def test_grad_accum_must_split_evenly_over_ranks():
    with pytest.raises(HarcError, match="cannot share grad_accum=2.*start 1 or 2 processes"):
        World(rank=0, size=4).check_grad_accum(2)
    assert World(rank=1, size=2).micro_batches(3, 4) == [13, 15]


def test_rank_scaled_accumulation_averages_to_the_single_process_gradient():
    """Rank r runs micro-batches a = r (mod W), each backward scaled by 1/len(its share); DDP's mean
    over ranks then equals one process's sum over all micro-batches / grad_accum."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    xs = torch.randn(8, 3, 5)  # 2 steps x 4 micro-batches

    def grads(indices, scale):
        w.grad = None
        for a in indices:
            (scale * (xs[a] @ w).tanh().sum()).backward()
        return w.grad.clone()

    for step in range(2):
        single = grads(World().micro_batches(step, 4), 1 / 4)
        for size in (2, 4):
            shares = [World(rank=r, size=size).micro_batches(step, 4) for r in range(size)]
            ddp = torch.stack([grads(s, 1 / len(s)) for s in shares]).mean(0)
            torch.testing.assert_close(ddp, single)


def test_bootstrap_weights_do_not_depend_on_the_rank_count():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 3, generator=g) for b in (4, 4, 4, 2)]
    one = MeanAccumulator(n_boot=7, seed=5)
    for x in batches:
        one.add({"v": x})
    for size in (2, 3):
        accs = [MeanAccumulator(n_boot=7, seed=5) for _ in range(size)]
        for j, x in enumerate(batches):
            for r, acc in enumerate(accs):
                acc.add({"v": x}) if j % size == r else acc.skip(len(x))
        boot = sum(a.boot_sums["v"] for a in accs if "v" in a.boot_sums)
        torch.testing.assert_close(boot, one.boot_sums["v"])
        torch.testing.assert_close(sum(a.boot_counts for a in accs), one.boot_counts)


def test_mixed_device_types_are_refused():
    check_device_types(["cuda", "cuda"])
    with pytest.raises(HarcError, match="rank 0: cuda, rank 1: cpu"):
        check_device_types(["cuda", "cpu"])


# ---- memory plan

def _cfg(d: Dims) -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=d.n_layers, hidden_size=d.hidden,
                       intermediate_size=d.intermediate, num_attention_heads=d.n_heads,
                       num_key_value_heads=d.n_kv_heads, vocab_size=d.vocab,
                       name_or_path=d.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dims_count_the_parameters_and_lora_of_a_real_model(arch):
    model = tiny_model(arch)
    d = Dims.from_config(model.config)
    assert d.params() == sum(p.numel() for p in model.parameters())
    peft = attach_lora(model, r=4)
    assert d.lora_params(4) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_paper_models_have_their_published_sizes():
    assert MODELS["Llama-3.1-8B"].params() == 8_030_261_248
    assert MODELS["Llama-3.1-8B"].lora_params() == 83_886_080  # docs/bench/paper_configs-h200.json
    assert MODELS["Qwen2.5-7B"].lora_params() == 80_740_352
    assert 70.5e9 < MODELS["Llama-3.1-70B"].params() < 70.6e9


def test_calibration_reproduces_the_measured_peaks():
    q = MODELS["Qwen2.5-7B"]
    p = plan(q, "single", 1, rows=CALIBRATION["rows"], row_tokens=CALIBRATION["row_tokens"],
             resp_positions=CALIBRATION["chunk"], couple_layers=CALIBRATION["couple_layers"])
    static = _static_bench(q) / GIB
    kl_keep = CALIBRATION["chunk"] * q.hidden * 2 / GIB  # in the plan, not in the fit
    for ckpt, comp, key in [(False, False, "eager_gib"), (True, False, "checkpointed_gib"),
                            (False, True, "compiled_gib")]:
        act = p.act_checkpointed if ckpt else p.act_compiled if comp else p.act_eager
        assert static + act - kl_keep == pytest.approx(CALIBRATION[key], abs=1e-6)
    assert 0.9 < FIT["alpha"] < 1.2 and FIT["alpha_compiled"] < FIT["alpha"]


def test_fsdp_shards_weights_not_activations():
    d = MODELS["Llama-3.1-70B"]
    one, four = plan(d, "fsdp2", 1), plan(d, "fsdp2", 4)
    assert four.weights == pytest.approx(one.weights / 4)
    assert four.lora == pytest.approx(one.lora / 4) and four.act_eager == one.act_eager
    assert plan(d, "ddp", 8).weights == plan(d, "single", 1).weights


def test_memory_check_refuses_what_cannot_fit_and_says_what_would():
    cfg70 = _cfg(MODELS["Llama-3.1-70B"])
    with pytest.raises(HarcError, match="FSDP2 over 2 GPUs needs .*set gradient_checkpointing: true"):
        check_memory(World(rank=0, size=2), "fsdp2", cfg70, capacity_gib=131)
    with pytest.raises(HarcError, match="DDP over 8 GPUs .* use FSDP2 over 2 GPUs$"):
        check_memory(World(rank=0, size=8), "ddp", cfg70, capacity_gib=131,
                     gradient_checkpointing=True)
    ok = check_memory(World(rank=0, size=2), "fsdp2", cfg70, capacity_gib=131,
                      gradient_checkpointing=True)
    assert ok.peak(True) < 131
    assert check_memory(World(), "ddp", _cfg(MODELS["Llama-3.1-8B"]), capacity_gib=131).gpus == 1
    assert check_memory(World(), "ddp", cfg70) is None  # CPU: nothing to check against
