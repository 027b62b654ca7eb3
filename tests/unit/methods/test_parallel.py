"""Single-process parts of multi-process training (harc.methods.parallel): the loss-only forward
the engines wrap, the even share of extraction batches FSDP2 needs, and the start-up errors of
`harc train --nproc` / torchrun, raised before any model loads. The two-process runs are in
tests/integration/test_distributed_train.py."""


import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from train_helpers import make_config, make_data, make_trainer, perturb_lora, write_data
from transformers import LlamaConfig

import harc.methods.parallel as parallel
from harc.activations import rank_share
from harc.cli import main as harc_main
from harc.distributed import World, shard
from harc.errors import HarcError
from harc.memplan import MODELS
from harc.methods import Method, Trainer
from harc.methods.batching import collate
from harc.methods.config import BatchSizes
from harc.methods.parallel import Parallel, check_method, preflight

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]



def test_loss_then_backward_equals_the_micro_step(tmp_path):
    """`Method.loss` + a backward inside its block (what DDP / FSDP2 run) gives the terms,
    statistics and gradients of `micro_step`, with activation checkpointing too."""
    tr = make_trainer(tmp_path, gradient_checkpointing=True)
    perturb_lora(tr.model)
    tr.model.train()
    mb = collate(tr.sampler(0), tr.chat.tail_len, 0)
    ref_terms, ref_stats = tr.method.micro_step(mb, 0.25)
    ref = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    tr.model.zero_grad(set_to_none=True)
    with tr.method.loss(mb) as (loss, terms, stats):
        w = tr.method.weights()
        assert loss.item() == pytest.approx(sum(w[k] * terms[k].item() for k in terms), rel=1e-6)
        assert not any(t.requires_grad for t in terms.values())
        (loss * 0.25).backward()
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k])
    for k in ref_stats:
        torch.testing.assert_close(stats[k], ref_stats[k])
    for n, p in tr.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], msg=n)
    assert sum(g.abs().sum() for g in ref.values()) > 0


def test_one_process_runs_the_plain_single_process_code(tmp_path):
    tr = make_trainer(tmp_path, steps=1, refresh_every=0)
    assert tr.parallel.strategy is None and not hasattr(tr.parallel, "root")
    calls = []
    orig = tr.method.micro_step
    tr.method.micro_step = lambda mb, scale: calls.append(scale) or orig(mb, scale)
    tr.train()
    assert calls == [0.5, 0.5]  # grad_accum 2: each micro-batch's backward is scaled by 1/2


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 12])
def test_an_even_share_gives_every_rank_as_many_batches(size, n):
    items, bs = list(range(n)), 2
    counts = []
    for rank in range(size):
        share, padded = rank_share(World(rank=rank, size=size), items, bs, even=True)
        assert share[: len(share) - padded] == shard(items, rank, size, bs)
        assert share[len(share) - padded:] == items[:bs][:padded]
        counts.append(-(-len(share) // bs))
        assert rank_share(World(rank=rank, size=size), items, bs) == (shard(items, rank, size, bs),
                                                                      0)
    assert len(set(counts)) == 1


# ---- start-up errors: one line each, before any model loads

class NoLoss(Method):
    name = "no_loss"


def test_a_method_without_loss_cannot_train_in_several_processes():
    with pytest.raises(HarcError, match="'no_loss' cannot train in several processes"):
        check_method(NoLoss)
    check_method(parallel.METHODS.get("harc"))


def test_world_size_that_does_not_divide_grad_accum_is_refused(tmp_path):
    cfg = make_config(tmp_path, grad_accum=6)
    with pytest.raises(HarcError, match=r"4 processes cannot share grad_accum=6 micro-batches "
                                        r"evenly; .* or start 1 or 2 or 3 or 6 processes"):
        preflight(cfg, World(rank=0, size=4), "ddp")
    preflight(cfg, World(rank=0, size=3), "ddp")
    with pytest.raises(HarcError, match="unknown strategy 'zero3'; choose one of ddp, fsdp"):
        preflight(cfg, World(), "zero3")
    with pytest.raises(HarcError, match="cannot share grad_accum=6"):  # a Trainer checks it too
        Trainer(cfg, tiny_model(), tiny_tokenizer(), make_data(), world=World(rank=0, size=4))


@pytest.fixture
def big_model(tmp_path, monkeypatch):
    """A Llama-3.1-70B config on disk (no weights) seen from a CUDA rank of a 141 GB GPU."""
    d = MODELS["Llama-3.1-70B"]
    LlamaConfig(num_hidden_layers=d.n_layers, hidden_size=d.hidden,
                intermediate_size=d.intermediate, num_attention_heads=d.n_heads,
                num_key_value_heads=d.n_kv_heads, vocab_size=d.vocab).save_pretrained(tmp_path)

    class Props:
        total_memory = 141e9

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _dev: Props())
    return str(tmp_path)


def cuda_world(size):
    return World(rank=0, size=size, device=torch.device("cuda", 0))


def test_a_setup_over_the_memory_plan_is_refused_with_what_would_fit(tmp_path, big_model):
    cfg = make_config(tmp_path, model=big_model, grad_accum=8, batch=BatchSizes(),
                      max_prompt_tokens=256, max_response_tokens=256)  # 12 rows of 512 tokens
    with pytest.raises(HarcError, match=r"DDP over 8 GPUs needs about \d+ GiB .* use FSDP2 over"):
        preflight(cfg, cuda_world(8), "ddp")
    with pytest.raises(HarcError, match="under --strategy fsdp .* directions="):
        preflight(cfg, cuda_world(2), "fsdp")
    (tmp_path / "d.safetensors").write_bytes(b"")
    cfg.directions = str(tmp_path / "d.safetensors")
    with pytest.raises(HarcError, match=r"FSDP2 over 2 GPUs .* gradient_checkpointing: true"):
        preflight(cfg, cuda_world(2), "fsdp")
    cfg.gradient_checkpointing = True
    preflight(cfg, cuda_world(4), "fsdp")


def test_train_command_checks_nproc_before_launching(tmp_path, monkeypatch, capsys):
    import harc.methods.parallel
    import harc.models

    def boom(*a, **k):
        raise AssertionError("launched or loaded before the checks")

    monkeypatch.setattr(harc.methods.parallel, "launch", boom)
    monkeypatch.setattr(harc.models, "load_model", boom)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    paths = write_data(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  harmful: {paths['harmful']}\n  harmless: {paths['harmless']}\n"
                   f"  pseudo: {paths['pseudo']}\ngrad_accum: 2\n")
    # a config that does not fit the processes is an input error; an unknown strategy, usage
    for args, msg, code in ((["--nproc", "3"], "3 processes cannot share grad_accum=2", 1),
                            (["--nproc", "2", "--strategy", "zero"], "unknown strategy 'zero'", 2)):
        with pytest.raises(SystemExit) as e:
            harc_main(["train", "--config", str(cfg), *args])
        assert e.value.code == code
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1

    launched = []
    monkeypatch.setattr(harc.methods.parallel, "launch", lambda n, args: launched.append((n, args)) or 0)
    with pytest.raises(SystemExit) as e:
        harc_main(["train", "--config", str(cfg), "--nproc", "2", "--strategy", "fsdp", "lr=2e-4"])
    assert e.value.code == 0
    assert launched == [(2, ["train", "--config", str(cfg), "--strategy", "fsdp", "lr=2e-4"])]


def test_parallel_refuses_a_method_without_loss_when_several_processes_train(tmp_path):
    with pytest.raises(HarcError, match="cannot train in several processes"):
        Parallel(World(rank=0, size=2), "ddp", tiny_model(), NoLoss(None, None, None, {}))
