"""Greedy generation on tiny random models: harc's decoder against transformers' generate (the
reference engine), token for token, in float32."""

import os
import warnings
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import harc._decode as dec
from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.generation import (
    Steer,
    _attention_impl,
    eos_token_ids,
    generate,
    generate_hf,
    generate_tokens,
    generate_tokens_hf,
)

pytestmark = pytest.mark.unit

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi",
           "Explain how to kill a Python process. " * 4, "system user assistant model " * 9,
           "Mix flour, water, salt and yeast.", "I'm sorry, but I can't help with that.",
           "Cutting Knowledge Date: December 2023 " * 2, "Write a poem about the sky and the waves."]
TEMPLATE = ("You are a helpful AI assistant. Cutting Knowledge Date: December 2023. Today Date: 26 "
            "Jul 2024. The waves roll under a blue sky; mix flour, water, salt and yeast. " * 3
            + "Now answer: {}")


def sharp(model, scale: float = 8.0):
    """A tiny random model whose tokens depend on their context: at the default initialisation
    attention is nearly uniform and different prompts often give the same text, which would let a
    decoder that mixes up rows' caches pass."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model


def run_both(model, tok, prompts, *, max_new=16, batch_size=3, prefills=None, engine=None, **kw):
    """(reference tokens, harc tokens, harc stats) for the rendered prompts (+ prefills); with
    `engine` (Engine settings) harc's decoder runs directly, without the fallback."""
    chat = ChatFormat(tok, max_prompt_tokens=480)
    seqs = [chat.encode_prompt(p) + (chat._tokenize(f) if f else [])
            for p, f in zip(prompts, prefills or [None] * len(prompts))]
    args = dict(eos_ids=eos_token_ids(model, tok), max_new_tokens=max_new)
    ref, new = [None] * len(seqs), [None] * len(seqs)

    def keep(out):
        def finish(rows, toks, _stopped):
            for r, t in zip(rows, toks):
                assert out[r] is None, "a row finished twice"
                out[r] = t
        return finish

    with torch.no_grad():
        generate_tokens_hf(model, seqs, finish=keep(ref), pad_id=tok.pad_token_id,
                           batch_size=batch_size, **args)
        if engine is None:
            stats = generate_tokens(model, seqs, finish=keep(new), pad_id=tok.pad_token_id,
                                    batch_size=batch_size, **args, **kw)
        else:
            eng = dec.Engine(model, slots=batch_size, **args, **engine)
            with _attention_impl(model, dec.ATTN):
                eng.run(seqs, keep(new))
            stats = eng.stats
    return ref, new, stats


def frequent_token(tokens: list[list[int]]) -> int:
    """A token the model emits mid-answer in several rows: declared as an extra EOS id, it makes
    rows stop at different steps."""
    counts = Counter(t for row in tokens for t in set(row[1:]))
    return counts.most_common(1)[0][0]


@pytest.mark.parametrize("arch,template", [("llama", "llama3.1"), ("qwen2", "qwen2.5"),
                                           ("gemma", "gemma"), ("gpt_neox", "chatml"),
                                           ("mistral", "mistral")])
def test_matches_reference_with_refills_prefills_and_early_stops(arch, template):
    tok, model = tiny_tokenizer(template), sharp(tiny_model(arch))
    prefills = [None, "Sure, here is", None, None, "I'm sorry", None, None, None, "The waves"]
    ref, _, _ = run_both(model, tok, PROMPTS, prefills=prefills)
    model.generation_config.eos_token_id = [tok.eos_token_id, frequent_token(ref)]
    ref, new, stats = run_both(model, tok, PROMPTS, prefills=prefills)
    assert new == ref
    lengths = [len(r) for r in ref]
    assert min(lengths) < 16 and max(lengths) == 16  # early stops and full-length rows
    assert stats["forwards"] > 0 and "fallback" not in stats


def test_shared_template_prefix_is_computed_once_and_changes_nothing():
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2"))
    prompts = [TEMPLATE.format(p) for p in PROMPTS[:6]] + PROMPTS[:3]
    ref, new, stats = run_both(model, tok, prompts, batch_size=4)
    assert new == ref
    chat = ChatFormat(tok, max_prompt_tokens=480)
    lens = sorted(len(chat.encode_prompt(p)) for p in prompts[:6])
    assert stats["prefix_tokens"] > 100  # one pass over the shared template...
    assert stats["prefill_tokens"] < sum(lens) - 4 * 100  # ...instead of one per prompt


def test_without_prefix_reuse_the_same_tokens():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    prompts = [TEMPLATE.format(p) for p in PROMPTS[:4]]
    ref, new, stats = run_both(model, tok, prompts, prefix_reuse=False)
    assert new == ref and stats["prefix_tokens"] == 0


def compacting_stops(model, tok, prompts, batch_size, **kw):
    """Declare extra EOS ids until rows stop out of order, so the tail moves live rows forward;
    every run must match the reference. Returns the last (reference, harc tokens, stats)."""
    ref, _, _ = run_both(model, tok, prompts, batch_size=batch_size)
    counts = Counter(t for row in ref for t in set(row[1:]))
    for extra, _ in counts.most_common(8):
        model.generation_config.eos_token_id = [tok.eos_token_id, extra]
        ref, new, stats = run_both(model, tok, prompts, batch_size=batch_size, **kw)
        assert new == ref
        if stats["compactions"]:
            return ref, new, stats
    raise AssertionError("no stop token made the batch shrink")


def test_finished_rows_free_their_slots_for_pending_prompts_and_the_batch_shrinks():
    tok, model = tiny_tokenizer("llama3.1"), sharp(tiny_model("llama"))
    prompts = PROMPTS + [TEMPLATE.format(p) for p in PROMPTS[:7]]
    ref, _, stats = compacting_stops(model, tok, prompts, 8)
    # Chunks of 8 in length order would each decode until their longest row ends.
    chat = ChatFormat(tok, max_prompt_tokens=480)
    order = sorted(range(len(prompts)), key=lambda i: len(chat.encode_prompt(prompts[i])))
    chunked = sum(max(len(ref[i]) for i in order[s: s + 8]) - 1 for s in range(0, len(order), 8))
    assert stats["fills"] > 2 and stats["steps"] < chunked


def test_prefix_groups_pick_the_long_shared_prefixes():
    head = list(range(1, 11))  # 10 tokens every row shares
    a, b = list(range(100, 200)), list(range(300, 380))
    seqs = [head + a + [7, i] for i in range(3)] + [head + b + [8, i, i] for i in range(3)] + \
           [head + [5], head + [6, 6]]
    group, plen, tokens = dec.prefix_groups(seqs)
    assert group[0] == group[1] == group[2] != group[3] == group[4] == group[5]
    assert plen[:6] == [111] * 3 + [91] * 3  # the whole shared run, up to the differing token
    assert group[6] == group[7] == -1 and plen[6] == 0
    assert tokens[group[0]] == seqs[0][:111]
    # a row never lends its last token to the prefix: something must be left to prefill
    group, plen, _ = dec.prefix_groups([head + a, head + a, head + a + [1]])
    assert max(plen) == len(head + a) - 1


def test_on_done_reports_rows_as_they_finish_and_matches_the_result():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    ref = generate_hf(model, ChatFormat(tok), PROMPTS, max_new_tokens=12)
    model.generation_config.eos_token_id = [tok.eos_token_id,
                                            frequent_token([tok.encode(r) for r in ref])]
    calls, seen = [], {}

    def on_done(rows, texts):
        calls.append(list(rows))
        seen.update(zip(rows, texts))

    progress = []
    out = generate(model, ChatFormat(tok), PROMPTS, max_new_tokens=12, batch_size=3,
                   on_done=on_done, progress=progress.append)
    assert out == generate_hf(model, ChatFormat(tok), PROMPTS, max_new_tokens=12, batch_size=3)
    assert len(calls) > 1 and sorted(r for c in calls for r in c) == list(range(len(PROMPTS)))
    assert [seen[i] for i in range(len(PROMPTS))] == out
    assert sum(progress) == len(PROMPTS)


def test_steering_edits_match_reference():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    chat = ChatFormat(tok)
    torch.manual_seed(1)
    vecs = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    for steer in (Steer("add", vecs, alpha=4.0, slots=(2,)), Steer("ablate", vecs)):
        ref = generate_hf(model, chat, PROMPTS, max_new_tokens=12, batch_size=4, steer=steer)
        assert generate(model, chat, PROMPTS, max_new_tokens=12, batch_size=4, steer=steer) == ref
        assert ref != generate_hf(model, chat, PROMPTS, max_new_tokens=12, batch_size=4)


class ToyMonitor:
    """Records what it sees; stops odd prompts at their third generated token."""

    replacement = "[stopped by the monitor]"

    def __init__(self, slot):
        self.slot, self.seen = slot, {}

    def __call__(self, h, rows):
        for x, r in zip(h, rows):
            self.seen.setdefault(r, []).append(x.clone())
        return torch.tensor([r % 2 == 1 and len(self.seen[r]) == 3 for r in rows])


def test_monitor_sees_each_new_token_and_stops_rows():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    chat = ChatFormat(tok)
    ref = generate_hf(model, chat, PROMPTS, max_new_tokens=10)
    mon = ToyMonitor(slot=0)
    out = generate(model, chat, PROMPTS, max_new_tokens=10, batch_size=4, monitor=mon)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o == (mon.replacement if i % 2 else r)
    # The residual entering block 0 is the embedding of the token just generated.
    emb = model.get_input_embeddings().weight
    for i in range(0, len(PROMPTS), 2):
        toks = generate_tokens_row(model, tok, PROMPTS[i], 10)
        seen = torch.stack(mon.seen[i])
        assert len(seen) == len(toks) - 1  # every generated token but the last is fed back
        torch.testing.assert_close(seen, emb[toks[:-1]])
    assert all(len(mon.seen[i]) == 3 for i in range(1, len(PROMPTS), 2))


def generate_tokens_row(model, tok, prompt, max_new):
    out = []
    generate_tokens_hf(model, [ChatFormat(tok).encode_prompt(prompt)],
                       eos_ids=eos_token_ids(model, tok), pad_id=tok.pad_token_id,
                       max_new_tokens=max_new, batch_size=1, finish=lambda r, t, s: out.extend(t))
    return out[0]


def test_monitor_on_the_last_block_output_and_bad_slots():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama", n_layers=4))
    mon = ToyMonitor(slot=4)
    generate(model, ChatFormat(tok), PROMPTS[:2], max_new_tokens=6, monitor=mon)
    assert mon.seen[0][0].shape == (32,)
    with pytest.raises(HarcError, match="outside"):
        generate(model, ChatFormat(tok), PROMPTS[:2], max_new_tokens=6, monitor=ToyMonitor(slot=5))


# the CUDA-graph path, exercised on CPU ------------------------------------------------------------
SYNCING = {"_local_scalar_dense", "nonzero", "item", "is_nonzero", "equal", "masked_select",
           "unique_consecutive", "_unique2", "lift_fresh"}


class NoSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on ops that would make the host wait for the GPU or copy host data during a capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        assert name not in SYNCING, f"{func} in the decode step cannot be graph-captured"
        return func(*args, **(kwargs or {}))


class FakeGraphs:
    """CudaGraphs on CPU: the first step of a bucket runs, then is 'captured' (run under NoSync
    but with its effects undone, as a capture does not execute); replays re-run the step."""

    fail = False

    def __init__(self):
        self.graphs, self.seconds = {}, 0.0
        self.warmup_seconds, self.warmup_steps = 0.0, 0

    def eager(self, fn):
        fn()
        self.warmup_steps += 1

    def run(self, key, fn):
        engine, (b, width) = fn.func.__self__, key
        live = ~engine.st["done"][:b]
        assert not live.any() or engine.st["pos"][:b][live].max() < width, \
            "a live row's new token lies beyond the columns this step reads"
        if key in self.graphs:
            self.graphs[key]()
            return
        self.eager(fn)
        saved = ({k: t.clone() for k, t in engine.st.items()},
                 [(k.clone(), v.clone()) for k, v in zip(engine.cache.k, engine.cache.v)])
        with NoSync():
            fn()
        for k, t in saved[0].items():
            engine.st[k].copy_(t)
        for (k, v), (k0, v0) in zip(zip(engine.cache.k, engine.cache.v), saved[1]):
            k.copy_(k0)
            v.copy_(v0)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.graphs[key] = fn


@pytest.mark.parametrize("window", [1, 8])
def test_graph_path_is_capture_safe_and_matches_reference(monkeypatch, window):
    monkeypatch.setattr(dec, "CudaGraphs", FakeGraphs)
    # exact widths: a window whose steps outgrow the columns attention reads would show
    monkeypatch.setattr(dec, "width_bucket", lambda n, cap: min(n, cap))
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2"))
    prompts = PROMPTS + [TEMPLATE.format(p) for p in PROMPTS[:5]]
    # window 8 is the CUDA default: rows finish inside a window and stay in flight until its end
    _, _, stats = compacting_stops(model, tok, prompts, 8,
                                   engine=dict(graphs=True, window=window, min_rows=1))
    assert stats["graphs"] > 1 and stats["eager_fallback"] is None and stats["fills"] > 1
    # each capture follows one eager step, and the first step of all runs eagerly
    assert stats["warmup_steps"] == stats["graphs"] + 1
    if window > 1:  # one width per window (exact widths make every step a new one at window 1)
        assert stats["steps"] > stats["graphs"]  # most steps were replays


def test_failed_capture_warns_once_and_decodes_eagerly(monkeypatch):
    monkeypatch.setattr(dec, "CudaGraphs", FakeGraphs)
    monkeypatch.setattr(FakeGraphs, "fail", True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        ref, new, stats = run_both(model, tok, PROMPTS, graphs=True)
    assert new == ref and "not permitted" in stats["eager_fallback"]


def test_unsupported_model_falls_back_to_transformers_generate():
    # A sliding window shorter than the prompts: the slot cache does not model it, so the decoder
    # hands the request over to transformers' generate, which does.
    tok, model = tiny_tokenizer("mistral"), sharp(tiny_model("mistral"))
    model.config.sliding_window = 16
    with pytest.warns(UserWarning, match="sliding-window"):
        ref, new, stats = run_both(model, tok, PROMPTS[:4])
    assert new == ref and stats == {"fallback": True}


def test_no_eos_ids_means_full_length_rows_in_both_engines():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    ref, _, _ = run_both(model, tok, PROMPTS[:4])
    model.generation_config.eos_token_id = frequent_token(ref)  # would stop rows if used
    seqs = [ChatFormat(tok).encode_prompt(p) for p in PROMPTS[:4]]
    for engine in (generate_tokens_hf, generate_tokens):
        out = []
        engine(model, seqs, eos_ids=[], pad_id=tok.pad_token_id, max_new_tokens=16, batch_size=2,
               finish=lambda rows, toks, _s, out=out: out.extend(toks))
        assert [len(t) for t in out] == [16] * 4


def test_bad_settings_are_harc_errors():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    with pytest.raises(HarcError, match="max_new_tokens"):
        generate(model, ChatFormat(tok), ["hi"], max_new_tokens=0)
    with pytest.raises(HarcError, match="batch_size"):
        generate(model, ChatFormat(tok), ["hi"], batch_size=0)
    assert generate(model, ChatFormat(tok), [], max_new_tokens=4) == []


def test_generation_config_with_a_list_of_eos_ids():
    # Llama-3.1- and Qwen2.5-Instruct ship generation_config.eos_token_id as a list.
    tok, model = tiny_tokenizer("llama3.1"), sharp(tiny_model("llama"))
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("</s>")]
    out = generate(model, ChatFormat(tok), ["How do I bake bread?"], max_new_tokens=3)
    assert len(out) == 1 and isinstance(out[0], str)


def test_greedy_ignores_the_models_repetition_penalty():
    tok, model = tiny_tokenizer("chatml"), sharp(tiny_model("llama"))
    chat, prompts = ChatFormat(tok), ["How do I bake bread?", "Write a poem about the sea."]
    plain = generate(model, chat, prompts, max_new_tokens=12)
    model.generation_config.repetition_penalty = 5.0  # as a hub generation_config may set
    assert generate(model, chat, prompts, max_new_tokens=12) == plain
    assert generate_hf(model, chat, prompts, max_new_tokens=12) == plain
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decoder itself warns about nothing here
        generate(model, chat, prompts, max_new_tokens=4)


def interpreted_kernels() -> None:
    """Skip unless the decode kernels run under Triton's interpreter on CPU (tests/conftest.py
    turns it on without a GPU)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernel under Triton's interpreter on CPU")


def test_triton_decode_attention_matches_reference(monkeypatch):
    # Needs Triton's interpreter (tests/conftest.py turns it on without a GPU); head_dim 16, the
    # kernel's smallest. The graph stand-in also checks that the kernel's host side is capturable.
    interpreted_kernels()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setattr(dec, "CudaGraphs", FakeGraphs)
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2", n_layers=2, hidden=64))
    prompts = PROMPTS[:3] + [TEMPLATE.format(PROMPTS[3])]
    ref, _, stats = run_both(model, tok, prompts, max_new=6, engine=dict(graphs=True))
    assert stats["decode_attn"] == "sdpa"  # the default on CPU
    model.generation_config.eos_token_id = [tok.eos_token_id, frequent_token(ref)]
    # Every kernel call is also run through SDPA with the engine's mask (a copy without the
    # lengths), compared after the run: tokens alone barely depend on one column of the cache.
    pairs = []

    def both(module, query, key, value, mask, *args, **kw):
        out = dec._attention(module, query, key, value, mask, *args, **kw)
        if getattr(mask, "harc_lens", None) is not None:
            calls, path = dec._attn_calls[0], dec._decode_path[0]
            plain = dec._attention(module, query, key, value, mask.clone(), *args, **kw)
            dec._attn_calls[0], dec._decode_path[0] = calls, path
            pairs.append((out[0].clone(), plain[0].clone()))
        return out

    monkeypatch.setenv("HARC_DECODE_ATTN", "triton")
    ALL_ATTENTION_FUNCTIONS.register(dec.ATTN, both)
    try:
        ref, new, stats = run_both(model, tok, prompts, max_new=6, engine=dict(graphs=True))
    finally:
        ALL_ATTENTION_FUNCTIONS.register(dec.ATTN, dec._attention)
    assert new == ref and stats["decode_attn"] == "triton" and stats["fills"] > 1
    assert min(map(len, ref)) < 6 == max(map(len, ref))  # rows stopped at different steps
    assert len(pairs) > 10
    for out, plain in pairs:
        torch.testing.assert_close(out, plain)


def test_triton_steps_read_the_whole_cache_unless_that_changes_the_split_count():
    eng = dec.Engine(tiny_model("qwen2"), max_new_tokens=4, slots=4, eos_ids=[0])
    eng.cache = SimpleNamespace(k=[torch.zeros(1, 2, 1, 1)])  # 2 KV heads
    eng.stats["decode_attn"] = "sdpa"
    assert eng._width(256, 320, 1024) == 320  # SDPA reads every column it is given
    eng.stats["decode_attn"] = "triton"  # on CPU the kernel sizes its splits for 8 "SMs"
    assert eng._width(256, 320, 1024) == 1024  # 512 programs: one split at either width
    assert eng._width(2, 320, 1024) == 320  # 4 programs: 1 split over 320 columns, 2 over 1024


def test_triton_rmsnorm_matches_reference_and_is_removed_afterwards(monkeypatch):
    interpreted_kernels()
    monkeypatch.setenv("HARC_DECODE_NORM", "triton")
    tok, model = tiny_tokenizer("llama3.1"), sharp(tiny_model("llama", n_layers=2))
    ref, new, stats = run_both(model, tok, PROMPTS[:3], max_new=6)
    assert new == ref and stats["fused_norms"] == 2 * 2 + 1
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_residuals_match_reference_and_are_removed_afterwards(monkeypatch):
    interpreted_kernels()
    monkeypatch.setenv("HARC_DECODE_RESIDUAL", "triton")
    monkeypatch.setenv("HARC_DECODE_NORM", "triton")  # both: the fused layers call patched norms
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2", n_layers=3))
    ref, new, stats = run_both(model, tok, PROMPTS[:3], max_new=6)
    assert new == ref and stats["fused_residuals"] == 3 and stats["fused_norms"] == 3 * 2 + 1
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_triton_rotary_matches_reference_and_is_removed_afterwards(monkeypatch):
    interpreted_kernels()
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setenv("HARC_DECODE_ROPE", "triton")
    original = modeling_qwen2.apply_rotary_pos_emb
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2", n_layers=2))
    ref, new, stats = run_both(model, tok, PROMPTS[:3], max_new=6)
    assert new == ref and stats["fused_rotary"] == 1
    assert modeling_qwen2.apply_rotary_pos_emb is original


def test_merged_projections_match_reference_and_are_undone_afterwards(monkeypatch):
    interpreted_kernels()
    monkeypatch.setenv("HARC_DECODE_PROJ", "triton")
    tok, model = tiny_tokenizer("qwen2.5"), sharp(tiny_model("qwen2", n_layers=2))
    ref, new, stats = run_both(model, tok, PROMPTS[:3], max_new=6)
    assert new == ref and stats["merged_projections"] == 2 * 2
    assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size()
               for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())
