"""A minimal OpenAI-compatible chat-completions client (vLLM, llama.cpp server, TGI, OpenAI).

Standard library only (urllib), so attacker and judge models can be remote without new
dependencies. An instance is a `Callable[[list[str]], list[str]]`: one user message in, the
assistant's text out, which is the `generate` shape attacks and judges accept.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from harc.errors import HarcError

_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class ChatEndpoint:
    def __init__(self, base_url: str, model: str, *, api_key: str | None = None,
                 system: str | None = None, max_tokens: int = 512, temperature: float = 0.0,
                 timeout: float = 60.0, retries: int = 2, concurrency: int = 4):
        if not base_url.startswith(("http://", "https://")):
            raise HarcError(f"endpoint {base_url!r} must start with http:// or https://")
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.system = model, system
        self.api_key = api_key or os.environ.get("HARC_API_KEY")
        host = (urllib.parse.urlsplit(base).hostname or "").lower()
        if self.api_key and base.startswith("http://") and host not in _LOCAL_HOSTS:
            raise HarcError(f"endpoint {base_url!r} would receive the API key unencrypted: use "
                            "https://, or plain http:// only to localhost")
        self.max_tokens, self.temperature = max_tokens, temperature
        self.timeout, self.retries, self.concurrency = timeout, retries, max(1, concurrency)

    def __call__(self, prompts: list[str]) -> list[str]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self.complete(p) for p in prompts]
        with ThreadPoolExecutor(self.concurrency) as pool:  # HTTP waits, not CPU: threads suffice
            return list(pool.map(self.complete, prompts))

    def complete(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        return self.chat(messages + [{"role": "user", "content": prompt}])

    def chat(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages,
                           "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = self._post(body, headers)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise HarcError(f"{self.url} answered without choices[0].message.content: "
                            f"{json.dumps(data)[:200]}") from None

    def _post(self, body: bytes, headers: dict) -> Any:
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                # 429 and 5xx are worth another try (rate limit, model loading); 4xx are not
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                detail = e.read().decode("utf-8", "replace").replace("\n", " ")[:200]
                raise HarcError(f"{self.url} answered HTTP {e.code}: {detail}") from None
            except (TimeoutError, urllib.error.URLError) as e:
                reason = getattr(e, "reason", e)
                if not isinstance(reason, TimeoutError):  # refused, unknown host, bad TLS ...
                    raise HarcError(f"cannot reach {self.url} ({reason}); is the server running "
                                    "and the address right?") from None
                if attempt < self.retries:
                    continue
                raise HarcError(f"{self.url} did not answer within {self.timeout:g} s; "
                                "raise the timeout or check the server") from None
            except json.JSONDecodeError:
                raise HarcError(f"{self.url} answered with something that is not JSON") from None
        raise AssertionError("unreachable")


def resolve_generate(generate: Any, endpoint: str | None, model: str | None,
                     owner: str, **kw: Any):
    """The callable to use: `generate` if given, else a client for `endpoint`, else None."""
    if generate is not None:
        return generate
    if endpoint:
        if not model:
            raise HarcError(f"{owner}: an endpoint needs a model name (option 'model')")
        return ChatEndpoint(endpoint, model, **kw)
    return None
