"""Shared fixtures: every test runs on CPU with models built in the test session (no hub access)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LONGEN = REPO.parent / "shared" / "data" / "LonGen.jsonl"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built models go to a per-session cache unless SLKIT_CACHE is set (CI sets it to reuse builds)."""
    if not os.environ.get("SLKIT_CACHE"):
        os.environ["SLKIT_CACHE"] = str(tmp_path_factory.mktemp("slkit-cache"))
    yield


@pytest.fixture(scope="session")
def smoke_params():
    from slkit.running.params import load_params

    return load_params(REPO / "params" / "smoke.yaml")


@pytest.fixture(scope="session")
def tiny_model_path(smoke_params):
    from slkit.models.loading import resolve_model_path

    return resolve_model_path(smoke_params.model.path)


class ScriptedEngine:
    """An engine whose answers come from a function of the request: tests the stages' logic,
    not a model. Records every request it was given."""

    is_chat = False

    def __init__(self, answer):
        self.answer = answer
        self.requests = []

    def render(self, message: str) -> str:
        return f"<user>{message}</user>\n"

    def generate(self, requests, sampling, on_done=None):
        self.requests += requests
        if on_done:
            on_done(len(requests))
        return [self.answer(r) for r in requests]

    def close(self):
        pass


@pytest.fixture
def scripted_engine():
    return ScriptedEngine


class FakeGPU:
    """One GPU under vLLM's memory rules (vLLM 0.25.1's source, and the H200 run): an engine reserves
    gpu_memory_utilization of the card and refuses to start when less is free; a deleted engine keeps its
    memory until the process ends; sleep() frees it only when the engine was built with enable_sleep_mode,
    and the allocator behind sleep mode serves one engine per process."""

    total = 100.0

    def __init__(self):
        self.llms = []
        self.asked = []  # every request's vllm.SamplingParams keyword arguments, in order

    @property
    def reserved(self) -> float:
        return sum(llm.held for llm in self.llms)


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """A `vllm` module (LLM, SamplingParams, StructuredOutputsParams, LoRARequest) over a FakeGPU, for
    slkit.engines.vllm on a CPU: its LLM answers each request with 40 words drawn from the request's seed
    (finish_reason "length" when max_tokens is below 40), or, asked for structured outputs with a JSON schema,
    with an object of integers 1-10 for its required keys, as vLLM's guided decoding would; it reports each
    finished request to a use_tqdm bar factory as vLLM's LLM.generate does. Returns the FakeGPU, whose `asked`
    records every request's sampling params."""
    import random
    import sys
    import types

    from slkit.engines import vllm as vllm_engine

    gpu = FakeGPU()

    class Output:
        def __init__(self, sampling):
            rng = random.Random(sampling["seed"])
            text = " ".join(rng.choice(["river", "harbor", "lantern", "meadow", "canyon", "orchard"]) + str(i)
                            for i in range(40)) + "."
            schema = (sampling.get("structured_outputs") or {}).get("json")
            if schema:
                text = json.dumps({key: rng.randint(1, 10) for key in schema["required"]})
            finish = "length" if sampling["max_tokens"] < 40 and not schema else "stop"
            self.outputs = [types.SimpleNamespace(text=text, token_ids=list(range(40)), finish_reason=finish)]

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.held, self.slept = kwargs, 0.0, None
            wanted = kwargs["gpu_memory_utilization"] * gpu.total
            if gpu.total - gpu.reserved < wanted:  # vllm/v1/worker/utils.py: request_memory
                raise ValueError(f"Free memory on device ({gpu.total - gpu.reserved}/{gpu.total} GiB) on startup is "
                                 f"less than desired GPU memory utilization")
            if kwargs.get("enable_sleep_mode") and any(llm.kwargs.get("enable_sleep_mode") for llm in gpu.llms):
                raise AssertionError("CuMem allocator can only be used for one instance per process.")
            self.held = wanted
            gpu.llms.append(self)

        def generate(self, prompts, sampling_params, lora_request, use_tqdm):
            gpu.asked += sampling_params
            bar = use_tqdm(total=len(prompts), desc="Processed prompts") if callable(use_tqdm) else None
            outputs = []
            for sampling in sampling_params:
                outputs.append(Output(sampling))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            return outputs

        def sleep(self, level=1):
            self.slept = level
            if self.kwargs.get("enable_sleep_mode"):  # without it there is nothing in the pool to unmap
                self.held = 0.0

    class Tokenizer:
        eos_token_id, bos_token, chat_template = 0, None, None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [5, 6]}

        def get_vocab(self):
            return {}

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    sampling_module = types.ModuleType("vllm.sampling_params")
    sampling_module.StructuredOutputsParams = lambda **kw: kw
    request_module = types.ModuleType("vllm.lora.request")
    request_module.LoRARequest = lambda *spec: spec
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sampling_module)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request_module)
    monkeypatch.setattr(vllm_engine, "load_tokenizer", lambda model: Tokenizer())
    monkeypatch.setattr(vllm_engine, "resolve_model_path", lambda path: str(tmp_path))
    return gpu


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts, or a dead one it points at)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
