"""Generation engines behind one interface, so stages never care which backend runs.

    engine = load_engine(params, adapters={"generator": "runs/x/iter_1/adapters/generator"})
    texts = engine.generate([Request(prompt, role="generator", max_new_tokens=512, seed=1)], params.sampling)

A Request's prompt is what `engine.render` made of a user message (or a raw text to complete) and
its prefill the start of the answer the model goes on from, so chat turns, raw completions and
pre-filled answers are all the same call. `role` picks the LoRA adapter; None, or a role with no
adapter yet (iteration 1), generates with the base model.

Backends (engine.backend): transformers (here), vllm (slkit.vllm_engine, offline `LLM` on this GPU)
and openai (slkit.endpoint_engine, one or many OpenAI-compatible servers).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from slkit.params import Params, SamplingParams
from slkit.prompts import render_user_turn, uses_chat_template, with_bos

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


def top_k_top_p_probs(scores: Any, temperature: float, top_k: int, top_p: float) -> tuple[Any, Any]:
    """The sampling distribution of temperature, then top-k, then top-p (the order of transformers' and vLLM's
    samplers) over the k best tokens only: (probabilities, token ids), each (batch, k). Top-p keeps the best
    tokens until their mass reaches top_p, the one that crosses it included."""
    import torch

    values, ids = torch.topk(scores / temperature, min(top_k, scores.shape[-1]), dim=-1)  # best first
    probs = values.softmax(-1)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, ids


class TopKSampler:
    """A logits processor that samples the next token among the top-k (temperature, top-k, top-p as above) and
    leaves only it with a finite score, so that greedy decoding takes it. The distribution is the one
    transformers' warpers and multinomial give; the cost is not: on a CPU, sorting and sampling over Qwen's
    152k-token vocabulary took 0.2 s per step at batch 16, more than the 0.5B model's forward pass."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs, ids = top_k_top_p_probs(scores, self.temperature, self.top_k, self.top_p)
        chosen = ids.gather(-1, torch.multinomial(probs, 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


class LocalPrompts:
    """Prompts rendered here with the model's tokenizer: its chat template, or the plain format."""
    params: Params
    tokenizer: Any

    @property
    def is_chat(self) -> bool:
        return uses_chat_template(self.tokenizer, self.params.model.prompt_format)

    def render(self, message: str) -> str:
        return render_user_turn(self.tokenizer, message, self.params.model.prompt_format)


class TransformersEngine(LocalPrompts):
    """Batched, left-padded `generate` with every sampling parameter explicit and per-role LoRA adapters."""

    def __init__(self, params: Params, adapters: dict[str, str | None] | None = None):
        import torch
        from slkit.models import load_model, load_tokenizer, pick_device, quantize_int8_for_cpu

        self.params = params
        self.tokenizer = load_tokenizer(params.model)
        self.tokenizer.padding_side = "left"
        int8 = params.engine.cpu_int8 and pick_device(params.engine.device) == "cpu" and not params.model.load_in_4bit
        self.model = load_model(params.model, device=params.engine.device, for_training=False,
                                dtype="float32" if int8 else None)
        self.adapters = {role: path for role, path in (adapters or {}).items() if path}
        if self.adapters:
            from peft import PeftModel

            roles = list(self.adapters)
            self.model = PeftModel.from_pretrained(self.model, self.adapters[roles[0]], adapter_name=roles[0])
            for role in roles[1:]:
                self.model.load_adapter(self.adapters[role], adapter_name=role)
        self.int8_layers = quantize_int8_for_cpu(self.model, params.engine.cpu_int8_skip) if int8 else []
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)
        self._torch = torch

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        texts = [with_bos(self.tokenizer, p) for p in prompts]
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[str]:
        torch = self._torch
        outputs: list[str] = [""] * len(requests)
        # Group by adapter, then by prompt length so a batch pads little.
        order = sorted(range(len(requests)), key=lambda i: (str(requests[i].role), len(requests[i].text)))
        size = self.params.engine.batch_size
        i = 0
        while i < len(order):
            role = requests[order[i]].role
            batch = [order[i]]
            while len(batch) < size and i + len(batch) < len(order) and requests[order[i + len(batch)]].role == role:
                batch.append(order[i + len(batch)])
            i += len(batch)
            enc = self._encode([requests[j].text for j in batch])
            greedy = sampling.temperature == 0
            # With top-k on, TopKSampler draws the token after the repetition penalty and greedy search takes it.
            top_k_sampler = not greedy and sampling.top_k > 0
            warped = not greedy and not top_k_sampler  # transformers' own sampler (top_k 0: no top-k)
            kwargs = dict(
                max_new_tokens=max(requests[j].max_new_tokens for j in batch),
                min_new_tokens=sampling.min_new_tokens or None,
                do_sample=warped,
                temperature=sampling.temperature if warped else None,
                top_p=sampling.top_p if warped else None,
                top_k=sampling.top_k if warped else None,
                repetition_penalty=sampling.repetition_penalty,
                eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            if top_k_sampler:
                kwargs["logits_processor"] = [TopKSampler(sampling.temperature, sampling.top_k, sampling.top_p)]
            torch.manual_seed(stable_seed(*(requests[j].seed for j in batch)))
            with torch.inference_mode(), self._adapter(role):
                out = self.model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for row, j in enumerate(batch):
                ids = new_tokens[row][: requests[j].max_new_tokens]
                outputs[j] = postprocess(self.tokenizer.decode(ids, skip_special_tokens=True), sampling)
            if on_done:
                on_done(len(batch))
        return outputs

    def _adapter(self, role: str | None):
        import contextlib

        if role in self.adapters:
            self.model.set_adapter(role)
            return contextlib.nullcontext()
        if self.adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def close(self) -> None:
        del self.model
        import gc

        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()


def load_engine(params: Params, adapters: dict[str, str | None] | None = None) -> Engine:
    """The engine of params.engine.backend with each role's adapter (None: that role uses the base model)."""
    if params.engine.backend == "transformers":
        return TransformersEngine(params, adapters)
    if params.engine.backend == "vllm":
        from slkit.vllm_engine import VLLMEngine

        return VLLMEngine(params, adapters)
    if params.engine.backend == "openai":
        from slkit.endpoint_engine import EndpointEngine

        return EndpointEngine(params, adapters)
    raise ValueError(f"engine.backend: unknown backend {params.engine.backend!r}")
