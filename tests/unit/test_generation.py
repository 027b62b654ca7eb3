"""Greedy generation on a tiny random model."""

import pytest
from tiny import tiny_model, tiny_tokenizer

from harc.chat import ChatFormat
from harc.generation import generate

pytestmark = pytest.mark.unit


def test_generation_config_with_a_list_of_eos_ids():
    # Llama-3.1- and Qwen2.5-Instruct ship generation_config.eos_token_id as a list.
    tok, model = tiny_tokenizer("llama3.1"), tiny_model("llama")
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("</s>")]
    out = generate(model, ChatFormat(tok), ["How do I bake bread?"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_greedy_ignores_the_models_repetition_penalty():
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama")
    chat, prompts = ChatFormat(tok), ["How do I bake bread?", "Write a poem about the sea."]
    plain = generate(model, chat, prompts, max_new_tokens=12)
    model.generation_config.repetition_penalty = 5.0  # as a hub generation_config may set
    assert generate(model, chat, prompts, max_new_tokens=12) == plain
