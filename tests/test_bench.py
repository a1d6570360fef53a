"""The benchmark scripts run end to end on a tiny CPU model, so they cannot rot. (Their figures
come from the GPU device: docs/benchmarks.md.)"""
import json
import subprocess
import sys

from conftest import REPO


def _run(args, tmp_path):
    out = subprocess.run([sys.executable, *args, "--workdir", str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_train_memory_bench_tiny(tmp_path):
    stdout = _run(["bench/train_memory.py", "--tiny", "--lengths", "64", "--variants", "naive", "slkit-chunked",
                   "--out", str(tmp_path / "rows.jsonl")], tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["length"]) for r in rows] == [("naive", 64), ("slkit-chunked", 64)]
    assert all(r["tok_s"] > 0 and r["steps"] == 2 for r in rows)
    assert "| tiny-llama | naive |" in stdout and "| tiny-llama | slkit-chunked |" in stdout


def test_generate_speed_bench_tiny(tmp_path):
    stdout = _run(["bench/generate_speed.py", "--tiny", "--prompts", "2", "--new-tokens", "8", "--batch", "2"], tmp_path)
    assert "plain generate, batch 1" in stdout and "slkit transformers, batch 2" in stdout
