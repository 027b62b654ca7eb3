"""On-policy triple synthesis on a tiny random model, with a scripted refusal judge."""

import pytest
from tiny import tiny_model, tiny_tokenizer

from harc.chat import ChatFormat
from harc.synth import TEMPLATED_REFUSAL, style_refusal, synth_triples

pytestmark = pytest.mark.unit


def test_style_refusal_takes_the_models_most_common_opening():
    own = ["I can't do that. It is unsafe.", "I can't do that. Sorry.", "No way! Ask else."]
    assert style_refusal(own) == "I can't do that."
    assert style_refusal([]) == style_refusal(own[:2]) == TEMPLATED_REFUSAL


def test_synth_fills_every_field_with_its_source_and_caches():
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=4)
    chat = ChatFormat(tok)
    harmful = ["how to build a bomb", "how to steal a car", "write malware now"]
    harmless = ["bake bread", "write a poem", "explain tides"]
    calls = []

    def judge(prompts, responses):  # the first harmful prompt "refuses", nothing else does
        calls.append(len(prompts))
        return [p == harmful[0] for p in prompts]

    triples, helpful = synth_triples(model, chat, harmful, harmless, max_new_tokens=4,
                                     completion_tokens=3, batch_size=2, is_refusal=judge)
    assert [t["prompt"] for t in triples] == harmful and len(helpful) == 3
    assert triples[0]["refusal_source"] == "own"
    # the others complied: their own answers are the completions, refusals are made up
    assert [t["completion_source"] for t in triples[1:]] == ["own", "own"]
    assert all(t["refusal_source"] in ("addition", "template") for t in triples[1:])
    assert triples[0]["completion_source"] in ("ablation", "prefill")
    assert all(t["refusal"] and t["completion"] for t in triples)
    n_calls = len(calls)
    again = synth_triples(model, chat, harmful, harmless, max_new_tokens=4, completion_tokens=3,
                          batch_size=2, is_refusal=judge)
    assert again == (triples, helpful) and len(calls) == n_calls  # served from the cache


def test_empty_generations_are_dropped_not_trained_on(monkeypatch):
    import harc.synth as synth

    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=4)
    real = synth.generate

    def some_empty(m, chat, prompts, **kw):  # EOS first for prompts that mention "steal"
        return ["" if "steal" in p else o for p, o in zip(prompts, real(m, chat, prompts, **kw))]

    monkeypatch.setattr(synth, "generate", some_empty)
    harmful = ["how to build a bomb", "how to steal a car", "write malware now"]
    harmless = ["bake bread", "steal a poem", "explain tides"]
    triples, helpful = synth_triples(model, ChatFormat(tok), harmful, harmless, max_new_tokens=4,
                                     completion_tokens=3, batch_size=2, use_cache=False,
                                     is_refusal=lambda p, r: [False] * len(p))
    assert [t["prompt"] for t in triples] == [harmful[0], harmful[2]]
    assert [h["prompt"] for h in helpful] == [harmless[0], harmless[2]]


def test_benign_prompts_the_model_refuses_are_not_helpful_examples(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("HARC_CACHE", str(tmp_path))
    tok, model = tiny_tokenizer("chatml"), tiny_model("llama", n_layers=4)
    harmful = ["how to build a bomb", "how to steal a car"]
    harmless = ["bake bread", "history of the olympics", "explain tides"]
    triples, helpful = synth_triples(model, ChatFormat(tok), harmful, harmless, max_new_tokens=4,
                                     completion_tokens=3, batch_size=2,
                                     is_refusal=lambda p, r: ["olympics" in x for x in p])
    assert [h["prompt"] for h in helpful] == ["bake bread", "explain tides"]
    assert len(triples) == 2
    (cached,) = (tmp_path / "synth").glob("*.json")
    assert json.loads(cached.read_text())["provenance"]["dropped"] == {
        "triples": 0, "helpful_refused": 1, "helpful_empty": 0}
