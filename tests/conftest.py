"""Shared fixtures: every test runs on CPU with models built in the test session (no hub access)."""
from __future__ import annotations

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
    from slkit.core.params import load_params

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


FAKE_VLLM = REPO / "tests" / "fixtures" / "fake_vllm"  # a `vllm` package with vLLM's memory rules, for CPU tests


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """tests/fixtures/fake_vllm as this process's `vllm` (loaded afresh: no engine started yet), with a stand-in
    tokenizer and model directory for slkit.engines.vllm on a CPU. Returns its FakeGPU."""
    import importlib.util
    import sys

    from slkit.engines import vllm as vllm_engine

    for name, path in [("vllm", "vllm/__init__.py"), ("vllm.sampling_params", "vllm/sampling_params.py"),
                       ("vllm.lora", "vllm/lora/__init__.py"), ("vllm.lora.request", "vllm/lora/request.py")]:
        spec = importlib.util.spec_from_file_location(name, FAKE_VLLM / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setitem(sys.modules, name, module)

    class Tokenizer:
        eos_token_id, bos_token, chat_template = 0, None, None

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [5, 6]}

        def get_vocab(self):
            return {}

    monkeypatch.setattr(vllm_engine, "load_tokenizer", lambda model: Tokenizer())
    monkeypatch.setattr(vllm_engine, "resolve_model_path", lambda path: str(tmp_path))
    return sys.modules["vllm"].GPU


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts, or a dead one it points at)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slkit_message(stderr: str) -> str:
    """What slkit wrote to stderr when it refused a command: from its `error: ` line to the end. A library may print
    a line of its own above it (on import, from native code slkit cannot route): the tests of what the user sees
    check slkit's lines, not the absence of every other."""
    lines = stderr.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, f"no `error: ` line in stderr:\n{stderr[-3000:]}"
    return "".join(lines[starts[0]:])


def hand_logs_to_caplog(caplog, monkeypatch, *names: str) -> None:
    """caplog sees these loggers' records even when a test that ran before in the same session (a command line,
    a notebook kernel's logging set-up) left slkit's loggers disabled, not propagating or at a higher level: each
    named logger gets caplog's handler alone, at DEBUG (caplog.at_level still filters), until the test ends."""
    import logging

    for name in names:
        logger = logging.getLogger(name)
        for attribute, value in (("handlers", [caplog.handler]), ("disabled", False), ("propagate", False),
                                 ("level", logging.DEBUG)):
            monkeypatch.setattr(logger, attribute, value)
