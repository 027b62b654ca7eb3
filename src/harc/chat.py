"""Chat-template rendering and the token positions HARC reads (HARC-METHOD §1).

`P` is the number of template tokens after the last user-content token, measured from the
template itself: render a placeholder message, find where the placeholder ends, count the tokens
after it. Then `t_inst = -P-1` (last user-content token) and `t_post = -1` (last prompt token).
The user content spans `head_len .. t_inst`; its sentence and line ends (`boundaries`) are where
a request embedded in a longer prompt usually ends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from harc.errors import HarcError

_PLACEHOLDER = "HARCPLACEHOLDERXYZ"

# A token whose text holds one of these ends a sentence, clause or line of the user content.
_BOUNDARY_CHARS = frozenset(".?!;:\n")

# The "raw template" variant of the reference configs (after Zhao et al. 2025): no system prompt.
RAW_TEMPLATES = {
    "qwen": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant",
    "llama": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@dataclass(frozen=True)
class PairEncoding:
    """A teacher-forced (prompt, response) sequence: response tokens start at `resp_start`.

    user_start: index of the first user-content token (0 when unknown). prefill_len: leading
    response tokens that are given (a harmful opening the model must recover from), not targets.
    boundaries: indices of user-content tokens at sentence and line ends (`ChatFormat.boundaries`;
    empty unless asked for).
    """

    ids: list[int]
    resp_start: int
    resp_len: int
    user_start: int = 0
    prefill_len: int = 0
    boundaries: tuple[int, ...] = ()


class ChatFormat:
    """Renders user prompts with a tokenizer's chat template and locates t_inst / t_post."""

    def __init__(self, tokenizer, *, system_prompt: str | None = None,
                 raw_template: str | None = None, max_prompt_tokens: int = 256,
                 max_response_tokens: int = 256):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.raw_template = RAW_TEMPLATES.get(raw_template, raw_template) if raw_template else None
        if self.raw_template is not None and self.raw_template.count("{}") != 1:
            raise HarcError("a raw template must contain exactly one '{}' where the prompt goes")
        if self.raw_template is None and not getattr(tokenizer, "chat_template", None):
            raise HarcError(
                "this tokenizer has no chat template; give a chat model, or set raw_template "
                "(e.g. 'qwen', 'llama' or a string with '{}')"
            )
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens
        self.head_len, self.tail_len = self._measure_template()
        self._ends: dict[int, bool] = {}  # token id -> its text holds a boundary character
        if max_prompt_tokens < self.head_len + self.tail_len + 1:
            raise HarcError(
                f"max_prompt_tokens={max_prompt_tokens} is shorter than the chat template itself "
                f"({self.head_len + self.tail_len} tokens); raise it"
            )

    def render(self, prompt: str) -> str:
        """The prompt as the model sees it: user turn plus the generation prompt."""
        prompt = prompt.strip()
        if self.raw_template is not None:
            return self.raw_template.replace("{}", prompt)
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # jinja raises many types; the user needs one line
            raise HarcError(f"the chat template failed to render a user turn: {e}") from e

    def _tokenize(self, text: str) -> list[int]:
        # Templates carry their own special tokens (BOS included where the model wants one).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _measure_template(self) -> tuple[int, int]:
        text = self.render(_PLACEHOLDER)
        start = text.find(_PLACEHOLDER)
        if start < 0:
            raise HarcError("the chat template drops the user message; it has no user turn")
        end = start + len(_PLACEHOLDER)
        prefix, suffix = text[:start], text[end:]
        n_all = len(self._tokenize(text))
        # Head/tail are counted on the whole rendering, as the tokenizer merges across boundaries.
        if getattr(self.tokenizer, "is_fast", False):
            offsets = self.tokenizer(text, add_special_tokens=False,
                                     return_offsets_mapping=True)["offset_mapping"]
            head = sum(1 for s, _ in offsets if s < start)
            tail = sum(1 for s, _ in offsets if s >= end)
        else:
            head = len(self._tokenize(prefix))
            tail = len(self._tokenize(suffix)) if suffix else 0
        if head + tail >= n_all:
            raise HarcError("could not locate the user content inside the chat template")
        return head, tail

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, left-truncated inside the user content if too long.

        The template head and tail are kept intact, so t_inst/t_post stay meaningful.
        """
        if not prompt or not prompt.strip():
            raise HarcError("empty prompt")
        ids = self._tokenize(self.render(prompt))
        if len(ids) > self.max_prompt_tokens:
            keep = self.max_prompt_tokens - self.head_len
            ids = ids[: self.head_len] + ids[-keep:]
        return ids

    def encode_pair(self, prompt: str, response: str, *, add_eos: bool = True,
                    prefill: str | None = None, boundaries: bool = False) -> PairEncoding:
        """Prompt + response for teacher forcing; the response is right-truncated and ends with EOS.

        prefill: text placed before the response (tokenized on its own, counted in
        `max_response_tokens`, never a target). boundaries: also locate the prompt's boundaries.
        """
        p = self.encode_prompt(prompt)
        room = self.max_response_tokens - int(add_eos)
        f = self._tokenize(prefill)[: room - 1] if prefill else []  # leave a target token
        r = self._tokenize(response)[: room - len(f)]
        eos = self.tokenizer.eos_token_id
        if add_eos and eos is not None:
            r = r + [eos]
        if not r:
            raise HarcError(f"empty response for prompt {prompt[:40]!r}")
        return PairEncoding(p + f + r, len(p), len(f) + len(r), user_start=self.head_len,
                            prefill_len=len(f),
                            boundaries=tuple(self.boundaries(p)) if boundaries else ())

    def boundaries(self, prompt_ids: list[int]) -> list[int]:
        """Indices of the user-content tokens of an encoded prompt that end a sentence, clause or
        line (their text holds one of . ? ! ; : or a newline), the token before each of them (the
        last word, e.g. of a request followed by a newline) and t_inst; sorted."""
        first, last = self.head_len, len(prompt_ids) - self.tail_len - 1
        out = {last}
        for i in range(first, last + 1):
            t = prompt_ids[i]
            if t not in self._ends:
                self._ends[t] = not _BOUNDARY_CHARS.isdisjoint(self.tokenizer.decode([t]))
            if self._ends[t]:
                out.update((i, max(i - 1, first)))
        return sorted(out)

    @property
    def t_inst(self) -> int:
        return -self.tail_len - 1

    @property
    def t_post(self) -> int:
        return -1

    def template_hash(self) -> str:
        src = self.raw_template or self.tokenizer.chat_template or ""
        return hashlib.sha256(f"{src}\x00{self.system_prompt or ''}".encode()).hexdigest()[:16]


def left_pad(seqs: list[list[int]], pad_id: int, device=None):
    """Left-pad to a batch: returns input_ids, attention_mask and matching position_ids.

    Left padding puts t_inst/t_post in the same column for every row; position ids start at 0
    on each row's first real token, so padded and unpadded forwards agree.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    return ids, mask, pos
