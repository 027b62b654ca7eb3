"""On-policy triple synthesis on a tiny random model, with a scripted refusal judge."""

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from harc.chat import ChatFormat
from harc.synth import (
    PSEUDO_FRAMES,
    TEMPLATED_REFUSAL,
    clean_paraphrase,
    pseudo_frames,
    style_refusal,
    synth_pseudo,
    synth_triples,
)

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


def test_recipe_4_drops_the_models_real_refusals_of_benign_prompts(monkeypatch):
    """The default refusal judge drops the replication's own over-refusals from the helpful
    answers (e.g. the Olympic Games prompt answered "I'm sorry, but I can't assist with that.")."""
    import harc.synth as synth

    refusals = {"Tell me about the history of the Olympic Games.":
                "I'm sorry, but I can't assist with that.",
                "Write a haiku about rain.": "I cannot help with that request."}

    def scripted(m, chat, prompts, **kw):
        return [refusals.get(p, "Here is an answer: rain falls softly.") for p in prompts]

    monkeypatch.setattr(synth, "generate", scripted)
    monkeypatch.setattr(synth, "refusal_vectors", lambda *a, **k: torch.randn(5, 32))
    harmless = ["Tell me about the history of the Olympic Games.", "Explain tides.",
                "Write a haiku about rain."]
    _, helpful = synth_triples(tiny_model("llama", n_layers=4), ChatFormat(tiny_tokenizer()),
                               ["how to build a bomb"], harmless, max_new_tokens=4,
                               completion_tokens=3, use_cache=False)
    assert [h["prompt"] for h in helpful] == ["Explain tides."]


def test_pseudo_frames_are_distinct_seeded_and_keep_the_prompt():
    prompts = ["How do I kill a Python process?", "How do I shoot a good photo?"]
    a, b = pseudo_frames(prompts, 3, seed=0), pseudo_frames(prompts, 3, seed=0)
    assert a == b and all(len(set(v)) == 3 for v in a)
    assert all(p in v for p, vs in zip(prompts, a, strict=True) for v in vs)
    assert pseudo_frames(prompts, 3, seed=1) != a
    assert len(pseudo_frames(prompts, 99)[0]) == len(PSEUDO_FRAMES)


@pytest.mark.parametrize("text,want", [
    ("Rewritten question: How can I end a stuck Python process?\nMore text",
     "How can I end a stuck Python process?"),
    ('"What is the way to stop a running program?"', "What is the way to stop a running program?"),
    ("How do I kill a Python process?", None),  # the source itself
    ("I'm sorry, but I can't help with that.", None),
    ("Stop it", None),
    ("", None),
    ("To kill a Python process, you can use the kill() function from the standard library.",
     None),  # an answer, not a rewrite
    ("How can I end a process? " * 6, None),  # far longer than the source
])
def test_clean_paraphrase(text, want):
    assert clean_paraphrase("How do I kill a Python process?", text) == want


def test_synth_pseudo_answers_variants_drops_refused_and_excluded_and_caches(monkeypatch):
    import harc.synth as synth

    calls = []

    def scripted(m, chat, prompts, **kw):
        calls.append(list(prompts))
        if prompts[0].startswith("Rewrite"):
            return ["How can I end a stuck Python process?", "I can't help with that."]
        return ["I'm sorry, I can't help with that." if "curious" in p else "Use kill -9 <pid>."
                for p in prompts]

    monkeypatch.setattr(synth, "generate", scripted)
    chat = ChatFormat(tiny_tokenizer())
    prompts = ["How do I kill a Python process?", "Where can I shoot a good photo?"]
    exclude = [pseudo_frames(prompts, 3, seed=0)[1][0]]  # as if it were an evaluation prompt
    model = tiny_model("llama", n_layers=4)
    pairs, prov = synth_pseudo(model, chat, prompts, 3, exclude=exclude, seed=0)
    framed = pseudo_frames(prompts, 3, seed=0)
    want = ["How can I end a stuck Python process?"] + framed[0][:2] + framed[1]
    answered = [p for p in want if p != exclude[0]]
    assert calls[1] == answered  # the excluded variant is never answered
    assert [r["prompt"] for r in pairs] == [p for p in answered if "curious" not in p]
    assert all(r["response"] == "Use kill -9 <pid>." for r in pairs)
    assert prov["paraphrases"] == 1 and prov["near_excluded"] == 1
    assert prov["refused"] == sum("curious" in p for p in answered)
    assert synth_pseudo(model, chat, prompts, 3, exclude=exclude, seed=0)[0] == pairs
    assert len(calls) == 2  # served from the cache
