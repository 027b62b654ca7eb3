"""`kl_cache`: the base model's KL reference kept per retain row. It must give what the reference
forward gives, and training with it must match training without it."""

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from train_helpers import adapter_state, make_config, make_data, perturb_lora

from harc.errors import HarcError
from harc.methods import Trainer
from harc.methods.batching import collate
from harc.methods.step import KLCache, kl_reference

pytestmark = pytest.mark.unit


def micro_batches(trainer, n):
    chat = trainer.chat
    return [collate(trainer.sampler(i), chat.tail_len, chat.tokenizer.pad_token_id,
                    trainer.cfg.pad_multiple) for i in range(n)]


def test_cached_reference_equals_the_reference_forward(tmp_path, one_thread):
    trainer = Trainer(make_config(tmp_path), tiny_model("qwen2"), tiny_tokenizer("qwen2.5"),
                      make_data(n_b=5, n_p=3))
    model = trainer.model
    perturb_lora(model)  # the adapter must not leak into the reference
    cache = KLCache()
    mbs = micro_batches(trainer, 8)
    for mb in mbs:
        ref = kl_reference(model, mb)
        got = kl_reference(model, mb, cache)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # 8 micro-batches of 2 harmless + 1 pseudo rows over 5 + 3 rows: most rows came back
    assert cache.misses == len(cache.rows) == 8
    assert cache.hits == 8 * 3 - 8


def test_a_micro_batch_without_retain_rows_needs_no_reference(tmp_path):
    from harc.methods.config import BatchSizes

    trainer = Trainer(make_config(tmp_path, batch=BatchSizes(harmful=3, harmless=0, pseudo=0)),
                      tiny_model("llama"), tiny_tokenizer("chatml"), make_data())
    cache = KLCache()
    assert kl_reference(trainer.model, micro_batches(trainer, 1)[0], cache) is None
    assert not cache.rows


@pytest.mark.parametrize("method", ["harc", "sft"])
def test_training_with_the_cache_matches_training_without(tmp_path, one_thread, method):
    runs = {}
    for cached in (False, True):
        kw = dict(kl_cache=cached, checkpoint_every=0, steps=3)
        if method == "sft":
            from harc.methods.sft import SftConfig

            base = make_config(tmp_path / str(cached), **kw).model_dump()
            cfg = SftConfig(**{k: v for k, v in base.items() if k in SftConfig.model_fields
                               and k not in ("method", "weights")})
        else:
            cfg = make_config(tmp_path / str(cached), **kw)
        trainer = Trainer(cfg, tiny_model("llama"), tiny_tokenizer("chatml"),
                          make_data(n_b=4, n_p=2))
        trainer.train()
        runs[cached] = (adapter_state(trainer.model), trainer.method.kl_cache)
    assert runs[False][1] is None and runs[True][1].hits > 0
    for name, p in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][name], p, rtol=1e-4, atol=1e-6)


def test_the_cache_refuses_fsdp(tmp_path):
    from harc.distributed import World

    with pytest.raises(HarcError, match="kl_cache"):
        Trainer(make_config(tmp_path, kl_cache=True), tiny_model("llama"),
                tiny_tokenizer("chatml"), make_data(), world=World(size=2), strategy="fsdp")
