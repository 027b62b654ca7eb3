"""The engine: batching per (adapter, max_tokens), adapters never mixed, answers as rows finish,
input screening and output checks, draining, failures contained, and adapters loaded from disk
under their served names."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from serve_helpers import peft_two_adapters
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.unit
pytest.importorskip("pydantic")


def _cfg(**kw):
    from harc.serve.config import ServeConfig

    return ServeConfig.model_validate({"model": "tiny", **kw})


def _engine(model, cfg, generate_fn=None, **kw):
    from harc.chat import ChatFormat
    from harc.serve.engine import Engine, run_generate
    from harc.serve.policy import build_targets

    tok = tiny_tokenizer()
    eng = Engine(model, tok, {}, generate_fn=generate_fn or run_generate, **kw)
    eng.targets = build_targets(cfg, model, ChatFormat(tok), eng.active)
    return eng


def _state(model) -> str:
    """Which adapter a forward pass would use right now ("base": adapters disabled)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return "base" if all(m.disable_adapters for m in layers) else model.active_adapter


def _run(eng, jobs):
    """Submit (served name, prompt, max_tokens) jobs together; their Outcomes in order."""
    async def main():
        futs = [eng.enqueue(eng.targets[t], p, p, n, []) for t, p, n in jobs]
        return await asyncio.gather(*futs, return_exceptions=True)

    eng.start()
    try:
        return asyncio.run(main())
    finally:
        eng.close(10)


TWO = {"adapters": {"alpha": "unused-a", "beta": "unused-b"}}


def test_concurrent_requests_are_batched_per_adapter_and_never_mixed():
    model = peft_two_adapters()
    calls = []

    def fake(m, chat, prompts, max_new_tokens, batch_size, on_done):
        calls.append((_state(m), list(prompts), max_new_tokens))
        return [f"{_state(m)}|{p}" for p in prompts]

    eng = _engine(model, _cfg(**TWO), fake, max_batch_size=16, wait_ms=300)
    jobs = [(t, f"{t}-{i}", 4) for i in range(3) for t in ("tiny", "alpha", "beta")]
    jobs.append(("alpha", "alpha-long", 8))
    outs = _run(eng, jobs)
    for (target, prompt, _), out in zip(jobs, outs, strict=True):
        want = "base" if target == "tiny" else target
        assert out.text == f"{want}|{prompt}"  # answered under its own adapter
    assert len(calls) == 4  # one generate call per (adapter, max_tokens) group
    for state, prompts, n in calls:
        assert {p.split("-")[0] for p in prompts} == {"tiny" if state == "base" else state}
        assert n == (8 if prompts == ["alpha-long"] else 4)


def test_batches_hold_at_most_max_batch_size():
    sizes = []

    def fake(m, chat, prompts, n, bs, on_done):
        sizes.append(len(prompts))
        return list(prompts)

    eng = _engine(tiny_model(), _cfg(), fake, max_batch_size=2, wait_ms=200)
    outs = _run(eng, [("tiny", f"p{i}", 3) for i in range(5)])
    assert [o.text for o in outs] == [f"p{i}" for i in range(5)]
    assert max(sizes) == 2 and sum(sizes) == 5


def test_real_generation_per_adapter_matches_one_at_a_time():
    model = peft_two_adapters()
    prompt = tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "Write a poem about the sea"}], tokenize=False,
        add_generation_prompt=True)
    alone = {t: _run(_engine(model, _cfg(**TWO)), [(t, prompt, 6)])[0].text
             for t in ("tiny", "alpha", "beta")}
    assert len(set(alone.values())) == 3  # each adapter changes the answer
    order = ("alpha", "tiny", "beta", "beta", "alpha", "tiny")
    mixed = _run(_engine(model, _cfg(**TWO), wait_ms=300), [(t, prompt, 6) for t in order])
    assert [o.text for o in mixed] == [alone[t] for t in order]


def _layer(name, **hooks):
    """A policy layer (a harc.eval.filters plugin) with the given hook methods."""
    from harc.eval.filters import Filter

    return type(name.title(), (Filter,), {"name": name, **hooks})()


def test_a_failing_layer_fails_its_requests_only():
    def broken(self, prompts):
        raise RuntimeError("layer bug")

    eng = _engine(tiny_model(), _cfg(policies={"p": {"base": "tiny", "layers": ["keyword"]}}),
                  lambda m, c, prompts, n, b, done: ["ok"] * len(prompts), wait_ms=100)
    eng.targets["p"].layers = [_layer("broken", flags=broken)]
    outs = _run(eng, [("p", "x", 2), ("tiny", "y", 2)])
    assert isinstance(outs[0], RuntimeError) and outs[1].text == "ok"


def test_a_request_is_answered_when_its_row_finishes():
    """generate's on_done: the short answer comes back while the long one is still decoding."""
    release = threading.Event()

    def fake(m, chat, prompts, n, bs, on_done):
        on_done([0], ["short"])
        assert release.wait(30)
        on_done([1], ["long"])
        return ["short", "long"]

    eng = _engine(tiny_model(), _cfg(), fake, wait_ms=200)

    async def main():
        eng.start()
        first = eng.enqueue(eng.targets["tiny"], "a", "a", 4, [])
        second = eng.enqueue(eng.targets["tiny"], "b", "b", 4, [])
        early = await asyncio.wait_for(first, 30)
        assert not second.done()
        release.set()
        return early, await asyncio.wait_for(second, 30)

    try:
        early, late = asyncio.run(main())
    finally:
        release.set()
        eng.close(10)
    assert (early.text, late.text) == ("short", "long")


def test_output_checks_block_after_generation_in_layer_order():
    """`check_output(prompts, responses)` sees the request text and the answer; the first layer
    that flags it blocks it; input screening runs first and costs no generation."""
    seen = []

    def check_output(self, prompts, responses):
        seen.append((list(prompts), list(responses)))
        return ["secret" in r for r in responses]

    def fake(m, chat, prompts, n, bs, on_done):
        on_done(list(range(len(prompts))), [f"{p} has a secret" if "x" in p else p
                                            for p in prompts])
        return []  # every row was handed over through on_done

    eng = _engine(tiny_model(), _cfg(policies={"p": {"base": "tiny", "layers": ["keyword"]}}),
                  fake, wait_ms=200)
    kw = eng.targets["p"].layers[0]
    eng.targets["p"].layers = [kw, _layer("leak", check_output=check_output)]
    outs = _run(eng, [("p", "x", 4), ("p", "y", 4), ("p", "kill x", 4), ("tiny", "x", 4)])
    assert (outs[0].blocked_by, outs[0].finish_reason, outs[0].completion_tokens) == (
        "leak", "content_filter", 0)
    assert outs[0].text == eng.targets["p"].refusal
    assert outs[1].text == "y" and outs[1].blocked_by is None
    assert outs[2].blocked_by == "keyword"  # screened before generation
    assert outs[3].text == "x has a secret"  # the base model has no layers
    assert seen == [(["x", "y"], ["x has a secret", "y"])]


def test_a_layer_with_neither_hook_is_refused():
    from harc.errors import HarcError
    from harc.eval.filters import FILTERS, Filter

    class Rewriter(Filter):
        name = "toy_rewriter"

        def respond(self, generate, prompts, prefills, steer):
            return generate(prompts, prefills, steer)

    FILTERS.register(Rewriter)
    try:
        with pytest.raises(HarcError, match="neither screens inputs"):
            _engine(tiny_model(), _cfg(policies={"p": {"base": "tiny",
                                                       "layers": ["toy_rewriter"]}}))
    finally:
        FILTERS.unregister("toy_rewriter")


def test_close_drains_queued_jobs_and_refuses_new_ones():
    from harc.serve.engine import EngineClosed

    eng = _engine(tiny_model(), _cfg(), lambda m, c, prompts, n, b, done: ["done"] * len(prompts),
                  max_batch_size=1, wait_ms=0)

    async def main():
        eng.start()
        futs = [eng.enqueue(eng.targets["tiny"], f"p{i}", "", 2, []) for i in range(4)]
        await asyncio.to_thread(eng.close, 10)  # returns once the queue is empty
        outs = await asyncio.gather(*futs)
        with pytest.raises(EngineClosed):
            eng.enqueue(eng.targets["tiny"], "late", "", 2, [])
        return outs

    assert [o.text for o in asyncio.run(main())] == ["done"] * 4


def test_load_served_puts_each_adapter_under_its_name(tmp_path):
    from peft import LoraConfig, get_peft_model

    from harc.errors import HarcError
    from harc.serve.engine import load_served

    base_dir = tmp_path / "tiny-base"
    tiny_model().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    from harc.models import load_model

    for name, seed in (("alpha", 1), ("beta", 2)):
        torch.manual_seed(seed)
        m, _ = load_model(str(base_dir), device="cpu")
        get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
                       ).save_pretrained(tmp_path / name)
    cfg = _cfg(model=str(base_dir), device="cpu", threads=1,
               adapters={"alpha": str(tmp_path / "alpha"), "beta": str(tmp_path / "beta")})
    threads = torch.get_num_threads()
    try:
        model, tok = load_served(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert set(model.peft_config) == {"alpha", "beta"}
    with pytest.raises(HarcError, match="not a PEFT adapter"):
        load_served(_cfg(model=str(base_dir), device="cpu", adapters={"x": str(tmp_path)}))
