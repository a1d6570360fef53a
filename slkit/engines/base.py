"""The interface every engine offers (Request, Engine) and what all backends share: stop-string and
unfinished-sentence trimming, which texts max_new_tokens cut (Generated, CapTally), stable seeds, prompts
rendered with the model's own tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from slkit.core.params import Params, SamplingParams
from slkit.core.schema import EngineTiming
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
    prefill: str = ""  # the answer so far: generation continues it (extension phase 2)
    # A JSON schema the answer must follow (the judge's scores): backends with structured outputs (vLLM, most
    # servers) constrain decoding to it; the others ignore it and their callers check and retry.
    json_schema: dict | None = field(default=None, compare=False)
    # A check of the text so far (prefill + generated): True ends the generation at once, because the text
    # already breaks a rule that only gets worse as it grows (a repeated n-gram): whatever came next, it
    # would be rejected. Engines that stream their texts apply it (the endpoint engine); the rest ignore it.
    stop_early: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    @property
    def text(self) -> str:
        """Prompt and prefill as one raw text, for engines that complete text."""
        return self.prompt + self.prefill


class Engine(Protocol):
    is_chat: bool  # prompts are rendered with a chat template (else the plain instruction format)
    structured_outputs: bool  # a Request's json_schema constrains the answer (else it is ignored)

    def render(self, message: str) -> str: ...
    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[str]: ...  # Generated texts
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


class Generated(str):
    """A generated text that knows whether max_new_tokens ended it (`cut`): then the cap, not the model,
    set its length. Every engine returns these; as a str it goes wherever a text goes."""
    cut: bool
    stopped_early: bool  # the request's stop_early check ended it early: the text is rejected whatever came next

    def __new__(cls, text: str, cut: bool = False, stopped_early: bool = False) -> Generated:
        self = super().__new__(cls, text)
        self.cut, self.stopped_early = cut, stopped_early
        return self


def finished(raw: str, sampling: SamplingParams, at_cap: bool, stopped_early: bool = False) -> Generated:
    """The postprocessed text of a raw completion, cut when the backend stopped at the token cap (`at_cap`) and
    no stop string ended the text before it: a backend that applies stop strings only here (transformers, an
    endpoint sent 4 of them) generates on to the cap although the answer ended at the stop string."""
    stopped = cut_at_stop(raw, sampling.stop) != raw
    return Generated(postprocess(raw, sampling), at_cap and not stopped and not stopped_early, stopped_early)


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


class CapTally:
    """How many generated texts max_new_tokens cut, per cap (one stage may ask for several lengths: the queries
    stage's judge answers in 4 tokens, its self-instruct in more). A text that is not a Generated (a scripted
    engine's) counts as not cut. It also counts the texts their request's stop_early check ended (stopped_early)."""

    def __init__(self) -> None:
        self.outputs: Counter = Counter()
        self.cut: Counter = Counter()
        self.stopped_early = 0

    def add(self, requests: list[Request], texts: list[str]) -> None:
        for request, text in zip(requests, texts):
            self.outputs[request.max_new_tokens] += 1
            self.cut[request.max_new_tokens] += bool(getattr(text, "cut", False))
            self.stopped_early += bool(getattr(text, "stopped_early", False))

    def summary(self) -> dict[str, Any]:
        """{"outputs", "cut", "share", "stopped_early", "by_max_new_tokens": {cap: {"outputs", "cut", "share"}}}."""
        outputs, cut = sum(self.outputs.values()), sum(self.cut.values())
        return {"outputs": outputs, "cut": cut, "share": share(cut, outputs), "stopped_early": self.stopped_early,
                "by_max_new_tokens": {str(cap): {"outputs": n, "cut": self.cut[cap], "share": share(self.cut[cap], n)}
                                      for cap, n in sorted(self.outputs.items())}}


def log_engine_timing(run_dir: str | os.PathLike, event: str, pid: int, **fields: Any) -> None:
    """One line of runs/<run>/engine_timings.jsonl: engine starts, the run server's start, stop, sleep and wake."""
    line = EngineTiming(event=event, at=round(time.time(), 1), pid=pid, **fields).model_dump(exclude_none=True)
    try:
        with open(os.path.join(run_dir, "engine_timings.jsonl"), "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
    except OSError:
        pass  # a measurement only: never fail a stage over it


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
    structured_outputs = False

    @property
    def is_chat(self) -> bool:
        return uses_chat_template(self.tokenizer, self.params.model.prompt_format)

    def render(self, message: str) -> str:
        return render_user_turn(self.tokenizer, message, self.params.model.prompt_format)


