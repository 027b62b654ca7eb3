"""Tiny random-weight models and a byte-level tokenizer with real chat templates (no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TEMPLATES = {
    # ChatML as in SmolLM2 (default system prompt when none is given)
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful AI assistant<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Qwen2.5 (system prompt "You are Qwen..." by default)
    "qwen2.5": (
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content']"
        " + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba "
        "Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}"
        "{%- if message.role != 'system' %}{{- '<|im_start|>' + message.role + '\\n' + message.content"
        " + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Llama-3.1 (abridged: date header, trimmed content)
    "llama3.1": (
        "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
        "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
        "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] | trim }}{%- endif %}"
        "{{- '<|eot_id|>' }}{%- for message in messages %}{%- if message.role != 'system' %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
        "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content']"
        " | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\\n'}}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
}

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>",
            "<end_of_turn>", "[INST]", "[/INST]"]

_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, then knead and rest.",
    "Explain how to kill a Python process. Use kill with the process id.",
    "Write a poem about the sea and the sky. The waves roll under a blue sky.",
    "I'm sorry, but I can't help with that request. Sure, here is how to do it.",
    "system user assistant model You are a helpful AI assistant Qwen Alibaba Cloud",
    "Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
] * 20


def tiny_tokenizer(template: str = "chatml") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    eos = {"chatml": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3.1": "<|eot_id|>",
           "gemma": "<end_of_turn>", "mistral": "</s>"}[template]
    bos = {"llama3.1": "<|begin_of_text|>"}.get(template, "<s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token="<pad>")
    fast.chat_template = TEMPLATES[template]
    return fast


def tiny_model(arch: str = "llama", vocab_size: int = 400, n_layers: int = 4, hidden: int = 32,
               seed: int = 0):
    """A random-weight decoder of a given family, built from its config."""
    from transformers import AutoConfig

    kinds = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma": "gemma",
             "gpt_neox": "gpt_neox"}
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=512,
                  pad_token_id=0)
    if arch != "gpt_neox":
        common.update(num_key_value_heads=2)
    if arch == "gemma":
        common.update(head_dim=8)
    cfg = AutoConfig.for_model(kinds[arch], **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()
