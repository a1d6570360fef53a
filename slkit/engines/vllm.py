"""The vLLM backend (engine.backend: vllm): offline `vllm.LLM` with per-role LoRA adapters.

One engine holds the base model once and serves every role: each request carries the LoRARequest
of its role (Generator, Extender) or none (base model), so a batch mixes roles freely. Every field
of vLLM's SamplingParams that matters is set from the recipe (vLLM's own max_tokens default is 16).
Prompts are token ids made by slkit's tokenizer, so a pre-filled answer is a raw completion and the
BOS rule is the transformers engine's. A stage is one notebook process: vLLM's GPU memory goes back
when the process ends, before the training notebook starts; a closed engine keeps it until then. The
length-control stage, which trains between two engines, runs each in a child process of its own.

vLLM installs on Linux with a CUDA GPU only (`pip install slkit[gpu]`); the request building below
is plain Python so it is tested on CPU.
"""
from __future__ import annotations

import gc
import io
import os
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from slkit.core.params import Params, SamplingParams
from slkit.engines.base import Generated, LocalPrompts, Request, finished, log_engine_timing, stop_token_ids
from slkit.models.chat import with_bos
from slkit.models.loading import compute_dtype, load_tokenizer, resolve_model_path

# Requests handed to vLLM per call: big enough to keep its scheduler full, small enough for progress.
CALL_SIZE = 1024


def lora_ids(adapters: dict[str, str | None] | None) -> dict[str, tuple[str, int, str]]:
    """(name, id, path) per role that has an adapter; ids start at 1 and follow the role order."""
    present = [(role, path) for role, path in (adapters or {}).items() if path]
    return {role: (role, i, str(path)) for i, (role, path) in enumerate(present, start=1)}


def sampling_kwargs(sampling: SamplingParams, request: Request, stop_ids: list[int]) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for one request: every field explicit."""
    greedy = sampling.temperature == 0
    return dict(
        n=1,
        max_tokens=request.max_new_tokens,
        min_tokens=min(sampling.min_new_tokens, request.max_new_tokens),
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=0 if greedy or sampling.top_k == 0 else sampling.top_k,  # 0: no top-k cut
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        seed=request.seed,
        stop=[s for s in sampling.stop if s],
        stop_token_ids=stop_ids,
        ignore_eos=False,
        skip_special_tokens=True,
    )


def engine_kwargs(params: Params, model_dir: str, with_lora: bool = True) -> dict[str, Any]:
    """Keyword arguments of vllm.LLM for a recipe (LoRA off when no role has an adapter yet: iteration 1).
    The LoRA rank served is engine.vllm.max_lora_rank, or the rank the adapters are trained with."""
    vp = params.engine.vllm
    kwargs: dict[str, Any] = dict(
        model=model_dir,
        tokenizer=model_dir,
        dtype=compute_dtype(params.model.dtype, "cuda"),
        seed=params.seed,
        trust_remote_code=params.model.trust_remote_code,
        gpu_memory_utilization=vp.gpu_memory_utilization,
        max_num_seqs=vp.max_num_seqs,
        enforce_eager=vp.enforce_eager,
        tensor_parallel_size=vp.tensor_parallel_size or 1,
        enable_prefix_caching=vp.enable_prefix_caching,
    )
    if with_lora:
        kwargs.update(enable_lora=True, max_loras=vp.max_loras,
                      max_lora_rank=supported_lora_rank(vp.max_lora_rank or params.training.lora_r))
    if vp.max_model_len:
        kwargs["max_model_len"] = vp.max_model_len
    if vp.compilation_config:
        kwargs["compilation_config"] = dict(vp.compilation_config)
    if params.model.load_in_4bit:
        kwargs["quantization"] = "bitsandbytes"
    return kwargs


def supported_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds `rank` (it takes 8, 16, 32, 64, 128, 256, 320, 512)."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"training.lora_r: vLLM serves LoRA ranks up to 512, got {rank}")


class VLLMEngine(LocalPrompts):
    structured_outputs = True  # a request's json_schema becomes vLLM's structured outputs (guided decoding)

    def __init__(self, params: Params, adapters: dict[str, str | None] | None = None):
        # The engine core runs in this (stage) process: a separate core process hung under pytest on
        # our H100, and a stage is a process of its own already. Set the variable to 1 to override.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM is optional (the vllm extra, Linux + CUDA) and reads that variable on import: imported here.
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.params = params
        self.tokenizer = load_tokenizer(params.model)
        model_dir = resolve_model_path(params.model.path)
        self.loras = {role: LoRARequest(*spec) for role, spec in lora_ids(adapters).items()}
        started = time.monotonic()
        self.llm = LLM(**engine_kwargs(params, model_dir, with_lora=bool(self.loras)))
        self.start_seconds = time.monotonic() - started  # load, torch.compile, CUDA graphs: paid once per stage
        self.generated_tokens = 0  # new tokens produced so far (tokens/s of a stage, benchmarks)
        self.generate_seconds = 0.0
        self.requests = 0
        self.eos_ids = stop_token_ids(SimpleNamespace(generation_config=_generation_config(model_dir)), self.tokenizer)
        self._log_timing("ready", start_s=round(self.start_seconds, 1))

    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[Generated]:
        from vllm import SamplingParams as VSamplingParams  # optional, as in __init__
        from vllm.sampling_params import StructuredOutputsParams

        outputs: list[Generated] = []
        started = time.monotonic()
        for start in range(0, len(requests), CALL_SIZE):
            chunk = requests[start:start + CALL_SIZE]
            prompts = [{"prompt_token_ids": self.tokenizer(with_bos(self.tokenizer, r.text),
                                                           add_special_tokens=False)["input_ids"]} for r in chunk]
            results = self.llm.generate(
                prompts,
                sampling_params=[VSamplingParams(**sampling_kwargs(sampling, r, self.eos_ids),
                                                 **({"structured_outputs": StructuredOutputsParams(json=r.json_schema)}
                                                    if r.json_schema else {})) for r in chunk],
                lora_request=[self.loras.get(r.role) for r in chunk],
                # vLLM reports each finished request to its progress bar: ours passes it on to on_done.
                use_tqdm=(lambda *args, **bar: FinishedRequests(on_done, *args, **bar)) if on_done else False)
            outputs += [finished(res.outputs[0].text, sampling, res.outputs[0].finish_reason == "length")
                        for res in results]
            self.generated_tokens += sum(len(res.outputs[0].token_ids) for res in results)
        self.generate_seconds += time.monotonic() - started
        self.requests += len(requests)
        return outputs

    def _log_timing(self, event: str, **fields: Any) -> None:
        log_engine_timing(self.params.run_dir, event, os.getpid(), **fields)

    def close(self) -> None:
        """Free what can be freed and log the GPU memory free then. `del` alone gives back nothing before the
        process ends (on the H200 a second engine found 20 of 140 GiB free): something in vLLM keeps the
        engine's tensors referenced, so a process runs one engine (vLLM's sleep mode did not help: a second
        engine after a slept one crashed on the H200, vLLM 0.25.1)."""
        del self.llm
        gc.collect()
        memory = {}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info()
            memory = {"gpu_free_gib": round(free / 2**30, 1), "gpu_total_gib": round(total / 2**30, 1)}
        self._log_timing("closed", start_s=round(self.start_seconds, 1), generate_s=round(self.generate_seconds, 1),
                         requests=self.requests, generated_tokens=self.generated_tokens, **memory)


class FinishedRequests(tqdm):
    """The progress bar vLLM's LLM.generate updates as each request finishes (its use_tqdm takes a factory of
    one): it draws nothing and hands each update to on_done, so a stage's progress moves within a call."""

    def __init__(self, on_done: Callable[[int], None], *args: Any, **bar: Any):
        self.on_done = on_done
        super().__init__(*args, file=io.StringIO(), **bar)

    def update(self, n: float | None = 1) -> bool | None:
        self.on_done(int(n or 0))
        return super().update(n)


def _generation_config(model_dir: str) -> Any:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # a model saved without generation_config.json
        return GenerationConfig()
