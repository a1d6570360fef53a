"""The interface every engine offers (Request, Engine) and what all backends share: stop-string and
unfinished-sentence trimming, stable seeds, prompts rendered with the model's own tokenizer."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from slkit.running.params import Params, SamplingParams
from slkit.models.chat import render_user_turn, uses_chat_template

_CLOSERS = "[\"')\\]”’」』》）】]*"
# An ASCII sentence end is followed by whitespace (not "3.5" or "e.g"); a CJK one needs nothing after it.
_SENTENCE_END = re.compile(f"[.!?]{_CLOSERS}(?=\\s|$)|[。！？]{_CLOSERS}|```\\s*$")


@dataclass(frozen=True)
class Request:
    prompt: str  # the full text to continue
    role: str | None  # "generator", "extender" or None for the base model
    max_new_tokens: int
    seed: int = 0
    prefill: str = ""  # the answer so far: generation continues it (extension stage 2)

    @property
    def text(self) -> str:
        """Prompt and prefill as one raw text, for engines that complete text."""
        return self.prompt + self.prefill


class Engine(Protocol):
    is_chat: bool  # prompts are rendered with a chat template (else the plain instruction format)

    def render(self, message: str) -> str: ...
    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Engine: ...
    def __exit__(self, *exc: object) -> None: ...


class ClosedOnExit:
    """`with engine:` closes the engine when the block ends, also when it raises."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


def cut_at_stop(text: str, stop: list[str]) -> str:
    """Text up to the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


# A last line that only opens a list item or a heading ("2.", "- ", "### ") holds no sentence yet.
_DANGLING_MARKER = re.compile(r"\n\s*(?:\d+[.)]|[-*•]|#+)?\s*(?:\*\*)?\s*$")


def trim_unfinished(text: str) -> str:
    """Drop an unfinished last sentence (text after the last sentence end), and a list number or
    heading mark that a capped answer left on its last line ("...end.\n\n2.")."""
    ends = list(_SENTENCE_END.finditer(text))
    text = text[:ends[-1].end()] if ends else text
    cut = _DANGLING_MARKER.search(text)
    return trim_unfinished(text[:cut.start()]) if cut and cut.start() > 0 and cut.end() - cut.start() > 0 else text


def postprocess(text: str, sampling: SamplingParams) -> str:
    text = cut_at_stop(text, sampling.stop)
    if sampling.trim_unfinished:
        text = trim_unfinished(text)
    return text.strip()


def stable_seed(*parts: Any) -> int:
    """A seed from any values, stable across processes (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's, the tokenizer's eos, a chat turn end."""
    configured = model.generation_config.eos_token_id
    ids = {configured} if isinstance(configured, int) else set(configured or [])
    ids.add(tokenizer.eos_token_id)
    for token in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>"):  # Gemma, Qwen, Llama 3 turn ends
        if token in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return sorted(i for i in ids if i is not None)


class LocalPrompts(ClosedOnExit):
    """Prompts rendered here with the model's tokenizer: its chat template, or the plain format."""
    params: Params
    tokenizer: Any

    @property
    def is_chat(self) -> bool:
        return uses_chat_template(self.tokenizer, self.params.model.prompt_format)

    def render(self, message: str) -> str:
        return render_user_turn(self.tokenizer, message, self.params.model.prompt_format)


