"""The transformers backend: batched `generate` on this machine's GPU or CPU, one LoRA adapter per role,
int8 weights on a CPU when asked, and a top-k sampler that is cheap on a CPU."""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Callable

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList

from slkit.core.params import Params, SamplingParams
from slkit.engines.base import Generated, LocalPrompts, Request, finished, stable_seed, stop_token_ids
from slkit.models.chat import with_bos
from slkit.models.loading import load_model, load_tokenizer, pick_device, quantize_int8_for_cpu


def top_k_top_p_probs(scores: Any, temperature: float, top_k: int, top_p: float) -> tuple[Any, Any]:
    """The sampling distribution of temperature, then top-k, then top-p (the order of transformers' and vLLM's
    samplers) over the k best tokens only: (probabilities, token ids), each (batch, k). Top-p keeps the best
    tokens until their mass reaches top_p, the one that crosses it included."""

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

        probs, ids = top_k_top_p_probs(scores, self.temperature, self.top_k, self.top_p)
        chosen = ids.gather(-1, torch.multinomial(probs, 1))
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


class StopEarly(StoppingCriteria):
    """Ends the rows of a batch whose request's stop_early check fires on its text so far (prefill + generated),
    checked every `every` tokens; the other rows generate on, sampled exactly as without it."""

    def __init__(self, tokenizer: Any, requests: list[Request], prompt_length: int, every: int = 32):
        self.tokenizer, self.requests, self.prompt_length, self.every = tokenizer, requests, prompt_length, every
        self.stopped = [False] * len(requests)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        new = input_ids.shape[1] - self.prompt_length
        if new % self.every == 0:
            for row, request in enumerate(self.requests):
                if request.stop_early is not None and not self.stopped[row]:
                    text = self.tokenizer.decode(input_ids[row, self.prompt_length:], skip_special_tokens=True)
                    self.stopped[row] = request.stop_early(request.prefill + text)
        return torch.tensor(self.stopped, device=input_ids.device)


class TransformersEngine(LocalPrompts):
    """Batched, left-padded `generate` with every sampling parameter explicit and per-role LoRA adapters."""

    def __init__(self, params: Params, adapters: dict[str, str | None] | None = None):
        self.params = params
        self.tokenizer = load_tokenizer(params.model)
        self.tokenizer.padding_side = "left"
        int8 = params.engine.cpu_int8 and pick_device(params.engine.device) == "cpu" and not params.model.load_in_4bit
        self.model = load_model(params.model, device=params.engine.device, for_training=False,
                                dtype="float32" if int8 else None)
        self.adapters = {role: path for role, path in (adapters or {}).items() if path}
        if self.adapters:
            roles = list(self.adapters)
            self.model = PeftModel.from_pretrained(self.model, self.adapters[roles[0]], adapter_name=roles[0])
            for role in roles[1:]:
                self.model.load_adapter(self.adapters[role], adapter_name=role)
        self.int8_layers = quantize_int8_for_cpu(self.model, params.engine.cpu_int8_skip) if int8 else []
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)

    def _encode(self, prompts: list[str]) -> dict[str, Any]:
        texts = [with_bos(self.tokenizer, p) for p in prompts]
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[Generated]:
        outputs: list[Generated] = [Generated("")] * len(requests)
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
            stop_early = StopEarly(self.tokenizer, [requests[j] for j in batch], enc["input_ids"].shape[1])
            if any(requests[j].stop_early for j in batch):
                kwargs["stopping_criteria"] = StoppingCriteriaList([stop_early])
            torch.manual_seed(stable_seed(*(requests[j].seed for j in batch)))
            with torch.inference_mode(), self._adapter(role):
                out = self.model.generate(**enc, **kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            eos = torch.tensor(self.eos_ids, device=new_tokens.device)
            for row, j in enumerate(batch):
                ids = new_tokens[row][: requests[j].max_new_tokens]
                # Cut: all max_new_tokens were generated and none ended the answer (a finished row is padded after
                # its end token, so it holds one).
                at_cap = len(ids) == requests[j].max_new_tokens and not torch.isin(ids, eos).any().item()
                outputs[j] = finished(self.tokenizer.decode(ids, skip_special_tokens=True), sampling, at_cap,
                                      stop_early.stopped[row])
            if on_done:
                on_done(len(batch))
        return outputs

    def _adapter(self, role: str | None):
        if role in self.adapters:
            self.model.set_adapter(role)
            return contextlib.nullcontext()
        if self.adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def close(self) -> None:
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
