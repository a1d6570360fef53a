"""Kill -9 at several moments and resume: the final records equal an uninterrupted run's.

The smoke recipe with engine.batch_size 1, so every text is a function of its own seed (with
larger batches a resumed stage draws different, equally valid samples; none is lost or duplicated).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "engine.batch_size=1", "--set", "macro_iterations=2"]


def _start(out_dir, env):
    return subprocess.Popen([sys.executable, "-m", "slkit", "run", str(REPO / "params" / "smoke.yaml"), "--no-progress",
                             "--set", f"output_dir={out_dir}", *SETTINGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _records(run_dir):
    """Every record of every jsonl file, in id order (files are written in completion order)."""
    out = {}
    for path in sorted(run_dir.rglob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out[str(path.relative_to(run_dir))] = sorted(rows, key=lambda r: str(r.get("id", r.get("index"))))
    return out


def _kill_when(proc, run_dir, condition, timeout=300):
    """SIGKILL the whole `slkit run` process group once condition(run_dir) holds."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            return False  # finished before the moment came
        if condition(run_dir):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    raise AssertionError("the kill moment never came")


def _progress(run_dir, iteration, stage, at_least=1):
    def check(_):
        try:
            state = json.loads((run_dir / f"iter_{iteration}" / "progress.json").read_text())
        except (OSError, ValueError):
            return False
        return state["stage"] == stage and state["done"] >= at_least
    return check


def _partial_has(run_dir, iteration, name, lines=1):
    def check(_):
        path = run_dir / f"iter_{iteration}" / f"{name}.jsonl.partial"
        return path.exists() and path.read_text().count("\n") >= lines
    return check


def _done(run_dir, iteration, stage):
    return lambda _: (run_dir / f"iter_{iteration}" / f"{stage}.done.json").exists()


def test_kill_and_resume_equals_uninterrupted(tmp_path, tiny_model_path):
    env = dict(os.environ)
    clean = _start(tmp_path / "clean", env)
    assert clean.wait(timeout=900) == 0, clean.stderr.read()[-2000:]
    expected = _records(tmp_path / "clean" / "smoke")

    run_dir = tmp_path / "killed" / "smoke"
    moments = [
        ("during drafts", _partial_has(run_dir, 1, "drafts", 3)),
        ("during extension", _partial_has(run_dir, 1, "extensions", 2)),
        ("during training", _progress(run_dir, 1, "training", 1)),
        ("between stages", _done(run_dir, 1, "evaluation")),
        ("during queries of iteration 2", _partial_has(run_dir, 2, "queries", 1)),
    ]
    killed = []
    for label, condition in moments:
        proc = _start(tmp_path / "killed", env)
        if _kill_when(proc, run_dir, condition):
            killed.append(label)
    final = _start(tmp_path / "killed", env)
    assert final.wait(timeout=900) == 0, final.stderr.read()[-2000:]
    assert len(killed) >= 4, killed
    got = _records(run_dir)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == expected[name], name
    for k in (1, 2):
        for role in ("generator", "extender"):
            a = (tmp_path / "clean" / "smoke" / f"iter_{k}" / "adapters" / role / "adapter_model.safetensors").read_bytes()
            b = (run_dir / f"iter_{k}" / "adapters" / role / "adapter_model.safetensors").read_bytes()
            assert a == b, (k, role)
