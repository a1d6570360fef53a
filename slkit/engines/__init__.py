"""Generation engines behind one interface, so stages never care which backend runs.

    engine = load_engine(params, adapters={"generator": "runs/x/iter_1/adapters/generator"})
    texts = engine.generate([Request(prompt, role="generator", max_new_tokens=512, seed=1)], params.sampling)

A Request's prompt is what `engine.render` made of a user message (or a raw text to complete) and
its prefill the start of the answer the model goes on from, so chat turns, raw completions and
pre-filled answers are all the same call. `role` picks the LoRA adapter; None, or a role with no
adapter yet (iteration 1), generates with the base model.

Backends (engine.backend), one module each: transformers (slkit.engines.transformers), vllm
(slkit.engines.vllm: the run's `vllm serve` when one is live, slkit.engines.server, else offline `LLM` in
this process) and openai (slkit.engines.endpoint, one or many
OpenAI-compatible servers). Every engine is a context manager: `with load_engine(...) as engine:` closes it.
"""
from __future__ import annotations

from slkit.core.params import Params
from slkit.engines.base import Engine, Request, stable_seed

__all__ = ["Engine", "Request", "load_engine", "stable_seed"]


def load_engine(params: Params, adapters: dict[str, str | None] | None = None) -> Engine:
    """The engine of params.engine.backend with each role's adapter (None: that role uses the base model).

    Each backend is imported here, when it is picked: a stage that reaches the run's server never imports
    peft, bitsandbytes or vLLM (seconds of every notebook kernel's start)."""
    if params.engine.backend == "transformers":
        from slkit.engines.transformers import TransformersEngine
        return TransformersEngine(params, adapters)
    if params.engine.backend == "vllm":
        from slkit.engines.server import server_engine
        if engine := server_engine(params, adapters):
            return engine
        from slkit.engines.vllm import VLLMEngine
        return VLLMEngine(params, adapters)
    if params.engine.backend == "openai":
        from slkit.engines.endpoint import EndpointEngine
        return EndpointEngine(params, adapters)
    raise ValueError(f"engine.backend: unknown backend {params.engine.backend!r}")
