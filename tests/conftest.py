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
    from slkit.params import load_params

    return load_params(REPO / "params" / "smoke.yaml")


@pytest.fixture(scope="session")
def tiny_model_path(smoke_params):
    from slkit.models import resolve_model_path

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


def free_port() -> int:
    """A TCP port nothing listens on now (for a server a test starts, or a dead one it points at)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
