import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from harc.activations import (
    MeanAccumulator,
    ResidualCapture,
    iter_prompt_acts,
    iter_read_acts,
    iter_response_acts,
    read_mask,
)
from harc.chat import ChatFormat, left_pad

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gpt_neox"])
def test_slots_are_block_inputs_plus_last_output(arch):
    model = tiny_model(arch)
    ids = torch.tensor([[3, 17, 42, 99, 7]])
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        cap = ResidualCapture(model, range(5)).run(model, input_ids=ids)
    for s in range(4):  # hidden_states[l] is the input of block l
        torch.testing.assert_close(cap[s], hs[s])
    assert cap[4].shape == hs[4].shape
    # the last slot is the raw output of the last block, before the final norm
    assert not torch.allclose(cap[4], hs[4]) or arch == "gpt_neox"


def test_stop_early_skips_later_blocks():
    model = tiny_model("llama")
    calls = []
    model.model.layers[3].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = ResidualCapture(model, [1], stop_early=True).run(model, input_ids=torch.tensor([[1, 2]]))
    assert list(out) == [1] and calls == []


def test_padded_batch_matches_single_examples():
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=3)
    chat = ChatFormat(tok)
    prompts = ["bake bread", "How do I kill a Python process at home?", "sea"]
    batched = next(iter_prompt_acts(model, chat, prompts, batch_size=3))
    for i, p in enumerate(prompts):
        single = next(iter_prompt_acts(model, chat, [p], batch_size=1))
        torch.testing.assert_close(batched["inst"][i], single["inst"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batched["post"][i], single["post"][0], atol=1e-5, rtol=1e-4)


def test_response_window_mean_over_first_n_tokens():
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=2)
    chat = ChatFormat(tok)
    pairs = [("bake bread", "Mix flour and water, then knead the dough for a while."),
             ("sea", "Waves.")]
    got = next(iter_response_acts(model, chat, pairs, n_tokens=4, batch_size=2))
    for i, (p, r) in enumerate(pairs):
        enc = chat.encode_pair(p, r, add_eos=False)
        ids, mask, pos = left_pad([enc.ids], tok.pad_token_id)
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        n = min(4, enc.resp_len)
        want = hs[1][0, enc.resp_start: enc.resp_start + n].mean(0)
        torch.testing.assert_close(got[i, 1], want, atol=1e-5, rtol=1e-4)


def test_works_under_a_peft_adapter():
    from harc.lora import attach_lora

    tok, model = tiny_tokenizer("chatml"), tiny_model("qwen2")
    peft_model = attach_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    acts = next(iter_prompt_acts(peft_model, ChatFormat(tok), ["hi there"]))
    assert acts["inst"].shape == (1, 5, 32)


def test_mean_accumulator_and_poisson_bootstrap_formula():
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    acc = MeanAccumulator(n_boot=7, seed=3)
    acc.add({"a": x[:6]})
    acc.add({"a": x[6:]})
    torch.testing.assert_close(acc.mean("a"), x.mean(0).float())
    g = torch.Generator().manual_seed(3)
    w = torch.cat([torch.poisson(torch.ones(7, 6, dtype=torch.float64), generator=g),
                   torch.poisson(torch.ones(7, 4, dtype=torch.float64), generator=g)], 1)
    want = torch.einsum("kb,bsd->ksd", w, x) / w.sum(1).view(-1, 1, 1)
    torch.testing.assert_close(acc.boot_means("a"), want.float())


@pytest.mark.parametrize("mode,boundaries", [("max", False), ("softmax", False), ("max", True)])
def test_read_acts_take_the_residual_where_harm_is_read(mode, boundaries):
    """Padded batches give, per slot, the residual at the largest cos(h, v) over the read positions
    of each unpadded prompt (or the softmax-weighted mean of them)."""
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=3)
    chat = ChatFormat(tok)
    prompts = ["bake bread. Then kill a process", "How do I kill a Python process at home?\nsea"]
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    got = next(iter_read_acts(model, chat, prompts, v, slots=[1, 3], mode=mode,
                              boundaries=boundaries, temp=0.2, batch_size=2))
    assert got.shape == (2, 2, 32)
    for i, p in enumerate(prompts):
        ids = chat.encode_prompt(p)
        mask = read_mask(chat, [ids], len(ids), boundaries)[0]
        if boundaries:
            assert mask.nonzero().squeeze(1).tolist() == chat.boundaries(ids)
        else:
            assert mask.sum() == len(ids) - chat.head_len - chat.tail_len
            assert mask[len(ids) + chat.t_inst] and not mask[len(ids) + chat.t_inst + 1]
        with torch.no_grad():
            cap = ResidualCapture(model, [1, 3]).run(model, input_ids=torch.tensor([ids]))
        for j, s in enumerate([1, 3]):
            h = cap[s][0][mask]
            cos = torch.nn.functional.cosine_similarity(h, v[j], dim=-1)
            want = (h[cos.argmax()] if mode == "max"
                    else (torch.softmax(cos / 0.2, 0)[:, None] * h).sum(0))
            torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=1e-4)
