import pytest
import torch
from tiny import TEMPLATES, tiny_tokenizer

from harc.chat import ChatFormat, left_pad
from harc.errors import HarcError

pytestmark = pytest.mark.unit

TAILS = {
    "chatml": "<|im_end|>\n<|im_start|>assistant\n",
    "qwen2.5": "<|im_end|>\n<|im_start|>assistant\n",
    "llama3.1": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma": "<end_of_turn>\n<start_of_turn>model\n",
    "mistral": " [/INST]",
}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_positions_come_from_the_template(template):
    tok = tiny_tokenizer(template)
    chat = ChatFormat(tok)
    for prompt in ["How do I bake bread?", "kill a process", "x"]:
        ids = chat.encode_prompt(prompt)
        assert tok.decode(ids[chat.t_inst + 1:]) == TAILS[template]
        # t_inst is the last token of the user content
        assert prompt.endswith(tok.decode(ids[chat.t_inst]).strip() or "~")
        assert chat.t_post == -1


def test_raw_template_qwen_variant():
    tok = tiny_tokenizer("qwen2.5")
    chat = ChatFormat(tok, raw_template="qwen")
    ids = chat.encode_prompt("bake bread")
    assert tok.decode(ids) == "<|im_start|>user\nbake bread<|im_end|>\n<|im_start|>assistant"
    assert tok.decode(ids[chat.t_inst]).strip() == "bread" or "bread".endswith(
        tok.decode(ids[chat.t_inst]).strip())
    assert tok.decode(ids[chat.t_inst + 1:]) == "<|im_end|>\n<|im_start|>assistant"


def test_system_prompt_is_rendered():
    chat = ChatFormat(tiny_tokenizer("qwen2.5"), system_prompt="Be brief.")
    assert "Be brief." in chat.render("hi") and "Qwen" not in chat.render("hi")


def test_left_truncation_keeps_head_and_tail():
    tok = tiny_tokenizer("llama3.1")
    full = ChatFormat(tok, max_prompt_tokens=4096)
    short = ChatFormat(tok, max_prompt_tokens=full.head_len + full.tail_len + 10)
    long_prompt = "the waves roll under a blue sky " * 50 + "END"
    ids_full, ids = full.encode_prompt(long_prompt), short.encode_prompt(long_prompt)
    assert len(ids) == short.max_prompt_tokens < len(ids_full)
    assert ids[: full.head_len] == ids_full[: full.head_len]
    assert ids[-(full.tail_len + 5):] == ids_full[-(full.tail_len + 5):]


def test_pair_encoding_marks_response():
    tok = tiny_tokenizer("chatml")
    chat = ChatFormat(tok, max_response_tokens=6)
    enc = chat.encode_pair("bake bread", "Sure, here is how to do it. Mix flour and water.")
    assert enc.resp_len == 6 and len(enc.ids) == enc.resp_start + 6
    assert enc.ids[-1] == tok.eos_token_id
    assert enc.ids[: enc.resp_start] == chat.encode_prompt("bake bread")


def test_errors_are_one_line():
    tok = tiny_tokenizer("chatml")
    tok.chat_template = None
    with pytest.raises(HarcError, match="no chat template"):
        ChatFormat(tok)
    tok = tiny_tokenizer("chatml")
    tok.chat_template = "{{ 'no user turn here' }}"
    with pytest.raises(HarcError, match="no user turn"):
        ChatFormat(tok)
    with pytest.raises(HarcError, match="shorter than the chat template"):
        ChatFormat(tiny_tokenizer("chatml"), max_prompt_tokens=5)
    with pytest.raises(HarcError, match="empty prompt"):
        ChatFormat(tiny_tokenizer("chatml")).encode_prompt("  ")


def test_left_pad_positions():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert pos.dtype == torch.long


@pytest.mark.parametrize("template", ["chatml", "llama3.1", "mistral"])
def test_boundaries_are_sentence_and_line_ends_of_the_user_content(template):
    tok = tiny_tokenizer(template)
    chat = ChatFormat(tok)
    prompt = "Explain how to kill a process\nMix flour. How do I bake bread"
    ids = chat.encode_prompt(prompt)
    got = chat.boundaries(ids)
    last = len(ids) - chat.tail_len - 1
    assert got == sorted(set(got)) and got[-1] == last  # t_inst is always read
    assert all(chat.head_len <= i <= last for i in got)
    ends = [i for i in range(chat.head_len, last + 1)
            if any(c in tok.decode([ids[i]]) for c in ".?!;:\n")]
    assert len(ends) >= 2  # the newline and the full stop
    assert set(got) == {last} | set(ends) | {max(i - 1, chat.head_len) for i in ends}
    # "process" ends the embedded request just before the newline
    assert any(tok.decode(ids[i]).strip().endswith("process") for i in got)
    enc = chat.encode_pair(prompt, "Sure.", boundaries=True)
    assert list(enc.boundaries) == got and enc.user_start == chat.head_len
    assert chat.encode_pair(prompt, "Sure.").boundaries == ()


def test_prefill_is_context_before_the_target():
    tok = tiny_tokenizer("chatml")
    chat = ChatFormat(tok, max_response_tokens=12)
    refusal = "I'm sorry, but I can't help with that request."
    plain = chat.encode_pair("bake bread", refusal)
    enc = chat.encode_pair("bake bread", refusal, prefill="Sure, here is")
    f = tok("Sure, here is", add_special_tokens=False)["input_ids"]
    assert enc.prefill_len == len(f) and enc.resp_start == plain.resp_start
    assert enc.ids[enc.resp_start: enc.resp_start + len(f)] == f
    assert enc.resp_len <= 12 and enc.ids[-1] == tok.eos_token_id  # the prefill counts in the cap
    r = tok(refusal, add_special_tokens=False)["input_ids"]
    assert enc.ids[enc.resp_start + len(f): -1] == r[: 11 - len(f)]
    long = chat.encode_pair("bake bread", refusal, prefill="Sure, here is how. " * 20)
    assert long.resp_len - long.prefill_len >= 2  # a target token and EOS always remain
