"""convert_gguf's parallel dequantisation (slkit.models.gguf_parallel): the checkpoint it writes is the one
transformers' own one-tensor-after-another loading writes, bit for bit, and where the hook cannot be used
the conversion says why and loads the ordinary way. On a tiny qwen2 GGUF holding Q4_K, Q6_K and Q8_0
tensors (tests/test_model_fetch.py writes it)."""
from __future__ import annotations

import contextlib
import filecmp
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import hand_logs_to_caplog
from test_model_fetch import write_tiny_qwen2_gguf

from slkit.models import gguf_parallel, loading


@pytest.fixture(autouse=True)
def module_log_captured(caplog, monkeypatch):
    hand_logs_to_caplog(caplog, monkeypatch, gguf_parallel.__name__, loading.__name__)


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("quantized-gguf") / "tiny-q.gguf"
    write_tiny_qwen2_gguf(path, quantized=True)
    return path


@pytest.fixture(scope="module")
def sequential(quantized_gguf, tmp_path_factory):
    """The checkpoint transformers writes on its own (one worker: the hook is not used)."""
    out = tmp_path_factory.mktemp("sequential")
    loading.convert_gguf(quantized_gguf, out, workers=1)
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    import torch
    from safetensors import safe_open

    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    for name in names:
        if name != "model.safetensors":
            assert filecmp.cmp(a / name, b / name, shallow=False), name
    with safe_open(a / "model.safetensors", "pt") as x, safe_open(b / "model.safetensors", "pt") as y:
        assert sorted(x.keys()) == sorted(y.keys())
        for key in x.keys():  # noqa: SIM118 - safe_open has no __iter__
            ta, tb = x.get_tensor(key), y.get_tensor(key)
            assert ta.dtype == tb.dtype == torch.bfloat16 and ta.shape == tb.shape, key
            assert torch.equal(ta.view(torch.int16), tb.view(torch.int16)), f"{key} differs"


@pytest.fixture
def hooks(monkeypatch):
    """The hooks parallel_gguf_loading yields during the test."""
    seen = []
    real = loading.parallel_gguf_loading

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with real(*args, **kwargs) as hook:
            seen.append(hook)
            yield hook

    monkeypatch.setattr(loading, "parallel_gguf_loading", spy)
    return seen


def test_the_parallel_checkpoint_is_bitwise_the_sequential_one(quantized_gguf, sequential, hooks, tmp_path, caplog):
    assert gguf_parallel.unavailable_reason(quantized_gguf, 2) is None
    with caplog.at_level(logging.INFO):
        loading.convert_gguf(quantized_gguf, tmp_path, workers=2)
    [hook] = hooks
    assert hook.problem is None and hook.served == len(hook.slots) == 9  # every quantized tensor, from the pool
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("slkit")]
    assert_same_checkpoint(sequential, tmp_path)


def test_a_failing_worker_leaves_the_rest_to_gguf_with_the_same_result(quantized_gguf, sequential, hooks, monkeypatch,
                                                                     tmp_path, caplog):
    import gguf

    def broken(*args):
        raise RuntimeError("worker broke")

    # The workers call gguf.quants.dequantize and inherit the patch (they are forked); transformers calls
    # gguf.dequantize, another name for the function, which stays.
    monkeypatch.setattr(gguf.quants, "dequantize", broken)
    with caplog.at_level(logging.WARNING):
        loading.convert_gguf(quantized_gguf, tmp_path, workers=2)
    [hook] = hooks
    assert hook.served == 0 and "worker broke" in hook.problem
    assert "worker broke" in caplog.text and "answered 0 of 9" in caplog.text
    assert_same_checkpoint(sequential, tmp_path)


def test_without_the_hook_the_conversion_logs_why_and_loads_sequentially(quantized_gguf, sequential, monkeypatch,
                                                                         tmp_path, caplog):
    """A transformers whose loader no longer imports gguf's dequantize per call (here: the function wrapped)."""
    from transformers import modeling_gguf_pytorch_utils as legacy

    real = legacy.load_gguf_checkpoint
    monkeypatch.setattr(legacy, "load_gguf_checkpoint", lambda *a, **kw: real(*a, **kw))
    monkeypatch.setattr(loading, "parallel_gguf_loading", lambda *a: pytest.fail("the hook must not be used"))
    with caplog.at_level(logging.WARNING):
        loading.convert_gguf(quantized_gguf, tmp_path, workers=2)
    assert "without parallel dequantisation: transformers' load_gguf_checkpoint no longer imports" in caplog.text
    assert_same_checkpoint(sequential, tmp_path)


def test_an_architecture_transformers_dequantizes_itself_is_left_to_it(quantized_gguf, monkeypatch):
    utils = pytest.importorskip("transformers.integrations.gguf.utils")
    monkeypatch.setattr(utils, "is_gguf_arch_supported", lambda arch: arch == "qwen2")
    assert gguf_parallel.unavailable_reason(quantized_gguf, 4) == \
        "transformers loads 'qwen2' GGUF files with its own dequantizer, not gguf's"


def test_the_tensor_table_is_gguf_readers(quantized_gguf):
    import gguf

    architecture, table = gguf_parallel.read_tensor_table(quantized_gguf)
    reader = gguf.GGUFReader(quantized_gguf)
    assert architecture == "qwen2"
    assert [(e.name, e.qtype, e.dims, e.data_offset) for e in table] == \
        [(t.name, int(t.tensor_type), tuple(reversed(t.shape.tolist())), int(t.data_offset)) for t in reader.tensors]
    plain = gguf_parallel._plain_array_reader(gguf.GGUFReader)(quantized_gguf)
    assert type(plain.data) is np.ndarray and list(plain.fields) == list(reader.fields)
    for a, b in zip(plain.tensors, reader.tensors):
        assert a.data.base is plain.data and np.array_equal(a.data, b.data)


def test_the_worker_count_defaults_to_the_cpus_and_the_environment_overrides_it(monkeypatch):
    import os

    monkeypatch.delenv(gguf_parallel.WORKERS_ENV, raising=False)
    assert gguf_parallel.conversion_workers() == len(os.sched_getaffinity(0))
    assert gguf_parallel.conversion_workers(3) == 3
    monkeypatch.setenv(gguf_parallel.WORKERS_ENV, "5")
    assert gguf_parallel.conversion_workers() == 5 and gguf_parallel.conversion_workers(2) == 2
    monkeypatch.setenv(gguf_parallel.WORKERS_ENV, "many")
    with pytest.raises(ValueError, match="SLKIT_CONVERT_WORKERS"):
        gguf_parallel.conversion_workers()
    assert gguf_parallel.unavailable_reason("unused.gguf", 1).startswith("1 worker process")


def test_a_pool_that_cannot_start_leaves_the_conversion_to_transformers(quantized_gguf, sequential, monkeypatch,
                                                                       tmp_path, caplog):
    import gguf

    def no_pool(*args, **kwargs):
        raise OSError("cannot fork")

    monkeypatch.setattr(gguf_parallel, "ProcessPoolExecutor", no_pool)
    real_reader, real_dequantize = gguf.GGUFReader, gguf.dequantize
    with caplog.at_level(logging.WARNING):
        loading.convert_gguf(quantized_gguf, tmp_path, workers=2)
    assert "the worker pool could not start (cannot fork)" in caplog.text
    assert (gguf.GGUFReader, gguf.dequantize) == (real_reader, real_dequantize)
    assert_same_checkpoint(sequential, tmp_path)
