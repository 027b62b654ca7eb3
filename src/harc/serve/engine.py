"""The model owner: one worker thread runs every forward pass; HTTP handlers only submit jobs.

Requests that arrive together are collected for `wait_ms` (up to `max_batch_size`) and run as one
`generate` call per (adapter, max_tokens) group: requests for different adapters never share a
forward pass, since the adapter is switched between calls (`set_adapter` / `disable_adapter`).
Input screening runs first, in the same thread, so a blocked request costs no generation; output
checks run on the finished text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from harc.errors import HarcError
from harc.eval.filters import Filter
from harc.generation import generate
from harc.lora import adapter_disabled, check_adapter_compat
from harc.models import load_model
from harc.serve.policy import Target, output_flags

log = logging.getLogger("harc.serve")
_STOP = object()


def run_generate(model, chat, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                 on_done: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """The server's one call into generation. `on_done(indices, texts)` is called as rows finish
    (generate's continuous batching), so a short answer need not wait for the longest."""
    return generate(model, chat, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    on_done=on_done)


class RenderedChat:
    """The part of ChatFormat that `generate` uses, for prompts already rendered from a whole
    conversation with the chat template (ChatFormat renders a single user turn)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _tokenize(self, text: str) -> list[int]:
        # Templates carry their own special tokens, as in ChatFormat.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        return self._tokenize(text)


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str  # "stop", "length" or "content_filter"
    completion_tokens: int
    blocked_by: str | None = None


@dataclass
class Job:
    target: Target
    prompt: str  # the conversation rendered with the chat template
    check: str  # what policy layers read: the system and user contents
    max_tokens: int
    stop: list[str]
    done: Callable[[Outcome | BaseException], None]  # called once, in the worker thread


class EngineClosed(Exception):
    """The engine is draining for shutdown and takes no new jobs."""


class Engine:
    def __init__(self, model, tokenizer, targets: dict[str, Target], *, max_batch_size: int = 16,
                 wait_ms: float = 10.0, generate_fn=run_generate):
        self.model, self.targets = model, targets
        self.chat = RenderedChat(tokenizer)
        self.max_batch_size, self.wait_s = max_batch_size, wait_ms / 1000
        self.generate_fn = generate_fn
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="harc-serve-engine", daemon=True)
        self.batches = 0  # generate calls so far (for /health and tests)

    def start(self) -> Engine:
        self._thread.start()
        return self

    @contextlib.contextmanager
    def active(self, adapter: str | None) -> Iterator[None]:
        """The model with `adapter` active, or with every adapter off for None."""
        if not hasattr(self.model, "peft_config"):  # a plain transformers model
            if adapter is not None:
                raise HarcError(f"adapter {adapter!r} is not loaded")
            yield
        elif adapter is None:
            with adapter_disabled(self.model):
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def submit(self, job: Job) -> None:
        with self._lock:  # no job may slip in behind the stop marker
            if self._closed:
                raise EngineClosed
            self._queue.put(job)

    def enqueue(self, target: Target, prompt: str, check: str, max_tokens: int,
                stop: list[str]) -> asyncio.Future:
        """Queue a job from the event loop; the returned future resolves to its Outcome.
        Raises EngineClosed at once while draining, so a handler can still answer 503."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result):
            if fut.done():  # the client went away
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        def done(result):
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(settle, result)

        self.submit(Job(target, prompt, check, max_tokens, stop, done))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Finish every job already queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, deadline, stop = [first], time.monotonic() + self.wait_s, False
            while len(batch) < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._process(batch)
            if stop:
                return

    def _process(self, batch: list[Job]) -> None:
        pending: list[Job] = []
        for jobs in _group(batch, lambda j: j.target.name):
            try:
                with self.active(jobs[0].target.adapter):
                    hits = _first_hits(jobs[0].target.input_layers, len(jobs),
                                       lambda layer, idx, js=jobs: layer.flags(
                                           [js[i].check for i in idx]))
            except Exception as e:  # a failing layer fails its requests, not the server
                _fail(jobs, e, "policy layer")
                continue
            for job, layer in zip(jobs, hits):
                if layer is None:
                    pending.append(job)
                else:
                    job.done(_refusal(job, layer))
        for jobs in _group(pending, lambda j: (j.target.adapter, j.max_tokens)):
            self._generate(jobs)

    def _generate(self, jobs: list[Job]) -> None:
        """One generate call for jobs of one adapter and max_tokens. A job without output checks
        is answered as soon as its row finishes; the others once the call returns, after their
        layers' `check_output` (never from inside generation, whose decoder state a layer running
        the model could disturb)."""
        texts: dict[int, str] = {}
        answered: set[int] = set()

        def on_done(rows: list[int], outs: list[str]) -> None:
            for i, text in zip(rows, outs):
                if jobs[i].target.output_layers:
                    texts[i] = text
                else:
                    answered.add(i)
                    jobs[i].done(self._finish(jobs[i], text))

        try:
            with self.active(jobs[0].target.adapter):
                outs = self.generate_fn(self.model, self.chat, [j.prompt for j in jobs],
                                        jobs[0].max_tokens, self.max_batch_size, on_done)
                self.batches += 1
                rest = [i for i in range(len(jobs)) if i not in answered]
                # checked as the client would get it: stop strings cut
                outcomes = {i: self._finish(jobs[i], texts[i] if i in texts else outs[i])
                            for i in rest}
                for idx in _group(rest, lambda i: jobs[i].target.name):
                    hits = _first_hits(jobs[idx[0]].target.output_layers, len(idx),
                                       lambda layer, sub, idx=idx: output_flags(
                                           layer, [jobs[idx[k]].check for k in sub],
                                           [outcomes[idx[k]].text for k in sub]))
                    for i, layer in zip(idx, hits):
                        answered.add(i)
                        jobs[i].done(outcomes[i] if layer is None else _refusal(jobs[i], layer))
        except Exception as e:
            _fail([j for i, j in enumerate(jobs) if i not in answered], e,
                  "generation or output check")

    def _finish(self, job: Job, text: str) -> Outcome:
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        # generate() returns text, so tokens are counted again; a decode/encode round trip can
        # split a character differently, hence the cap.
        n = min(len(self.chat._tokenize(text)), job.max_tokens)
        return Outcome(text, "length" if cut < 0 and n >= job.max_tokens else "stop", n)


def _group(items: list, key) -> list[list]:
    """Items grouped by key, groups in order of their first item."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.values())


def _first_hits(layers: list[Filter], n: int, check) -> list[Filter | None]:
    """For n requests of one target, the first layer that blocks each (None: passes every
    layer); `check(layer, indices)` returns one flag per index given."""
    hits: list[Filter | None] = [None] * n
    for layer in layers:
        idx = [i for i, h in enumerate(hits) if h is None]
        if not idx:
            break
        for i, flag in zip(idx, check(layer, idx), strict=True):
            if flag:
                hits[i] = layer
    return hits


def _refusal(job: Job, layer: Filter) -> Outcome:
    return Outcome(job.target.refusal, "content_filter", 0, layer.name)


def _fail(jobs: list[Job], error: Exception, stage: str) -> None:
    to = f" to {jobs[0].target.name}" if jobs else ""
    log.error("%s failed for %d request(s)%s", stage, len(jobs), to, exc_info=error)
    for job in jobs:
        job.done(error)


def load_served(cfg) -> tuple:
    """The base model of a ServeConfig with every adapter loaded under its served name."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if not cfg.adapters:
        return model, tok
    peft = None
    for name, path in cfg.adapters.items():
        check_adapter_compat(model, path)
        try:
            if peft is None:
                peft = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            else:
                peft.load_adapter(str(path), adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise HarcError(f"could not load adapter {name!r} from {path}: "
                            f"{str(e).splitlines()[0]}") from e
    return peft.eval(), tok
