"""OpenAI-compatible servers as an engine (engine.backend: openai): the scale-out path for generation.

    engine:
      backend: openai
      endpoint:
        base_urls: [http://gpu1:8000/v1, http://gpu2:8000/v1]   # e.g. `vllm serve MODEL --enable-lora`

Requests are spread over the servers with at most `concurrency` in flight on each; the openai
client retries connection errors, timeouts, 429 and 5xx with exponential backoff, and a request
whose server keeps failing moves on to the next server. With api "completions" (the default) the
prompt is rendered here with the model's tokenizer and sent as raw text, so pre-filled answers and
base models work; api "chat" sends the user message and lets the server apply its template.

Adapters: with adapters "load" each role's adapter directory is loaded into every server under a
name derived from its path (vLLM's /v1/load_lora_adapter; start the servers with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and give them the same filesystem), so each iteration's new
adapters reach running servers; "named" uses the names the servers were started with.

A request with a json_schema (the judge's) asks for it with OpenAI's response_format (type json_schema), which
vLLM, SGLang, llama.cpp and OpenAI honour; a server that refuses the field (transformers serve's completions
API answers 422) gets the request again without it, and this engine sends no schema from then on.

The API key, when one is needed, is read from the environment variable named by
engine.endpoint.api_key_env; it is never stored in params, records, logs or notebooks.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import httpx
from openai import OpenAI

from slkit.core.params import EndpointParams, Params, SamplingParams
from slkit.engines.base import Generated, LocalPrompts, Request, finished
from slkit.models.loading import load_tokenizer


def api_key(ep: EndpointParams) -> str:
    """The key from the environment variable the params name ("EMPTY" for servers that need none)."""
    if ep.api_key_env is None:
        return "EMPTY"
    key = os.environ.get(ep.api_key_env)
    if not key:
        raise ValueError(f"engine.endpoint.api_key_env: the environment variable {ep.api_key_env} is not set")
    return key


def adapter_name(role: str, path: str) -> str:
    """A served name unique to this adapter directory, so a new iteration's adapter gets a new name."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:10]
    return f"slkit-{role}-{digest}"


def request_body(request: Request, sampling: SamplingParams, model: str, api: str,
                 vllm_sampling: bool, bos: str | None = None) -> dict[str, Any]:
    """The JSON body of one request: the standard OpenAI fields, plus vLLM's when asked."""
    greedy = sampling.temperature == 0
    body: dict[str, Any] = dict(
        model=model,
        max_tokens=request.max_new_tokens,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        seed=request.seed,
    )
    stop = [s for s in sampling.stop if s][:4]  # the OpenAI API takes at most 4; the rest are cut here after
    if stop:
        body["stop"] = stop
    if api == "completions":
        text = request.text
        body["prompt"] = text[len(bos):] if bos and text.startswith(bos) else text  # the server adds <bos>
    else:
        body["messages"] = [{"role": "user", "content": request.prompt}]
        if request.prefill:
            if not vllm_sampling:
                raise ValueError("engine.endpoint.api: chat cannot pre-fill an answer on a server without vLLM's "
                                 "continue_final_message; use api: completions")
            body["messages"].append({"role": "assistant", "content": request.prefill})
    if request.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "answer", "schema": request.json_schema}}
    if vllm_sampling:
        body.update(top_k=-1 if greedy or sampling.top_k == 0 else sampling.top_k,
                    repetition_penalty=sampling.repetition_penalty,
                    min_tokens=min(sampling.min_new_tokens, request.max_new_tokens),
                    skip_special_tokens=True)
        if api == "chat" and request.prefill:
            body.update(continue_final_message=True, add_generation_prompt=False)
    return body


class EndpointEngine(LocalPrompts):
    def __init__(self, params: Params, adapters: dict[str, str | None] | None = None):
        self.params = params
        ep = self.endpoint = params.engine.endpoint
        key = api_key(ep)
        self.clients = [OpenAI(base_url=url, api_key=key, timeout=ep.timeout_s, max_retries=ep.max_retries)
                        for url in ep.base_urls]
        self.slots = [threading.Semaphore(ep.concurrency) for _ in ep.base_urls]
        self.tokenizer = None
        if ep.api == "completions":
            self.tokenizer = load_tokenizer(params.model)
        self.base_model = ep.model or params.model.path
        self.structured_outputs = True  # until a server refuses response_format
        self.models: dict[str, str] = {}
        self.loaded: list[str] = []
        # submit(): one request at a time, each on a worker thread of its own while it runs.
        self.max_in_flight = ep.concurrency * len(self.clients)
        self._workers: ThreadPoolExecutor | None = None
        self._order = itertools.count()
        self._abandon: dict[Future, threading.Event] = {}
        for role, path in (adapters or {}).items():
            if path:
                self.models[role] = self._serve_adapter(role, str(path))

    def _serve_adapter(self, role: str, path: str) -> str:
        ep = self.endpoint
        if ep.adapters == "none":
            return self.base_model
        if ep.adapters == "named":
            if role not in ep.adapter_names:
                raise ValueError(f"engine.endpoint.adapter_names: no served name for the {role} adapter")
            return ep.adapter_names[role]
        name = adapter_name(role, path)
        for client in self.clients:
            try:
                client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(Path(path).resolve())},
                            cast_to=httpx.Response)
            except Exception as err:  # noqa: BLE001 - any refusal but "already loaded" is the user's to fix
                if "already" not in str(err).lower():
                    raise RuntimeError(f"{client.base_url}: could not load the {role} adapter {path} ({err}); "
                                       "start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, "
                                       "or set engine.endpoint.adapters to named or none") from None
        self.loaded.append(name)
        return name

    @property
    def is_chat(self) -> bool:
        return self.tokenizer is None or super().is_chat

    def render(self, message: str) -> str:
        return message if self.tokenizer is None else super().render(message)  # chat API: the server's template

    def _complete(self, index: int, request: Request, sampling: SamplingParams,
                  abandoned: threading.Event | None = None) -> Generated:
        if request.json_schema is not None and self.structured_outputs:
            try:
                return self._send(index, request, sampling, abandoned)
            except RefusedRequest:
                # Most likely the schema (servers word it differently); a request refused for another reason is
                # refused again below, and that error is raised.
                self.structured_outputs = False
        return self._send(index, replace(request, json_schema=None), sampling, abandoned)

    def submit(self, request: Request, sampling: SamplingParams) -> Future:
        """Send one request now; its Generated text comes in the Future. It is streamed, so abandon() can end
        it on the server, and its stop_early check ends it as soon as the check says so."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="slkit-request")
        abandoned = threading.Event()
        future = self._workers.submit(self._complete, next(self._order), request, sampling, abandoned)
        self._abandon[future] = abandoned
        future.add_done_callback(lambda f: self._abandon.pop(f, None))
        return future

    def abandon(self, futures: list[Future]) -> None:
        """Stop streaming these submitted requests: the server ends a request whose client went away."""
        for future in futures:
            event = self._abandon.get(future)
            if event is not None:
                event.set()

    def _send(self, index: int, request: Request, sampling: SamplingParams,
              abandoned: threading.Event | None = None) -> Generated:
        ep = self.endpoint
        body = request_body(request, sampling, self.models.get(request.role, self.base_model), ep.api,
                            ep.vllm_sampling, getattr(self.tokenizer, "bos_token", None))
        standard = {k: body.pop(k) for k in list(body) if k in _STANDARD_FIELDS}
        errors = []
        for attempt in range(len(self.clients)):  # start on this request's server, then fail over
            server = (index + attempt) % len(self.clients)
            client = self.clients[server]
            try:
                with self.slots[server]:
                    if abandoned is not None:
                        return self._stream(client, standard, body, request, sampling, abandoned)
                    if ep.api == "completions":
                        choice = client.completions.create(**standard, extra_body=body or None).choices[0]
                        text = choice.text
                    else:
                        choice = client.chat.completions.create(**standard, extra_body=body or None).choices[0]
                        text = choice.message.content
                    return finished(text or "", sampling, choice.finish_reason == "length")
            except Exception as err:  # noqa: BLE001 - the client has retried already; try the next server
                if _is_client_error(err):
                    raise RefusedRequest(f"{client.base_url}: request refused: {err}") from None
                errors.append(f"{client.base_url}: {type(err).__name__}: {err}")
        raise RuntimeError(f"every server failed for one request ({ep.max_retries + 1} tries each); the records "
                           "written so far are kept: rerun once a server answers\n  " + "\n  ".join(errors))

    def _stream(self, client: OpenAI, standard: dict, body: dict, request: Request, sampling: SamplingParams,
                abandoned: threading.Event) -> Generated:
        """One streamed request: ended early when abandoned or when its stop_early check fires (closing the
        stream aborts the request on a vLLM server)."""
        create = client.completions.create if self.endpoint.api == "completions" else client.chat.completions.create
        stream = create(**standard, stream=True, extra_body=body or None)
        text, reason, unchecked, stopped_early = "", None, 0, False
        try:
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = (choice.text if self.endpoint.api == "completions" else choice.delta.content) or ""
                text += delta
                reason = choice.finish_reason or reason
                if abandoned.is_set():
                    return Generated("")
                unchecked += len(delta)
                if request.stop_early is not None and unchecked >= STOP_EARLY_EVERY_CHARS and reason is None:
                    unchecked = 0
                    if request.stop_early(request.prefill + text):
                        stopped_early = True
                        break
        finally:
            stream.close()
        return finished(text, sampling, reason == "length", stopped_early)

    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[Generated]:
        outputs: list[Generated] = [Generated("")] * len(requests)
        workers = self.endpoint.concurrency * len(self.clients)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self._complete, i, r, sampling): i for i, r in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    outputs[futures[future]] = future.result()
                    if on_done:
                        on_done(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return outputs

    def close(self) -> None:
        """Unload the adapters this engine loaded, so a long-running server pool does not fill up."""
        if self._workers is not None:
            self.abandon(list(self._abandon))
            self._workers.shutdown(wait=True, cancel_futures=True)
            self._workers = None
        for name in self.loaded:
            for client in self.clients:
                try:
                    client.post("/unload_lora_adapter", body={"lora_name": name}, cast_to=httpx.Response)
                except Exception:  # noqa: BLE001 - a server that is gone has nothing to unload
                    pass
        for client in self.clients:
            client.close()


# How much new text a streamed request receives between two stop_early checks: each check reads the whole
# text so far, so checking at every token would cost time quadratic in the text's length.
STOP_EARLY_EVERY_CHARS = 400


class RefusedRequest(RuntimeError):
    """A server answered 4xx: the request itself is wrong, another server would refuse it too."""


_STANDARD_FIELDS = {"model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop"}


def _is_client_error(err: Exception) -> bool:
    """A 4xx other than 408/409/429: the request itself is wrong, another server would refuse it too."""
    status = getattr(err, "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (408, 409, 429)
