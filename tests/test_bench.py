"""The benchmark scripts run end to end on a tiny CPU model, so they cannot rot. (Their figures
come from the GPU device: docs/benchmarks.md.)"""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`


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


def test_train_multi_gpu_bench_tiny(tmp_path):
    """Two gloo processes through the train stage's accelerate path: half the steps of one process."""
    stdout = _run(["bench/train_multi_gpu.py", "--tiny", "--gpus", "2", "--length", "64", "--samples", "4"], tmp_path)
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    assert [(r["processes"], r["steps"]) for r in rows] == [(1, 4), (2, 2)]
    assert "| tiny-llama | 2 | cpu |" in stdout


def test_vllm_bench_builds_a_full_vocabulary_checkpoint(tmp_path):
    """The vLLM rows need vLLM and a GPU; what runs here is the checkpoint they load: every id decodes."""
    sys.path.insert(0, str(REPO / "bench"))
    from generate_speed import build_vllm_checkpoint
    from transformers import AutoTokenizer

    model_dir, adapter = build_vllm_checkpoint("tiny-llama", tmp_path)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert tok.decode([10, 1023]) == "w6 w1019"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16


def test_cpu_generate_bench_tiny():
    out = subprocess.run([sys.executable, "bench/cpu_generate.py", "--model", "builtin:tiny-random-llama",
                          "--batches", "1", "2", "--tokens", "3"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith(("| float32 |", "| int8 |",
                                                                                       "| bfloat16 |"))]
    assert len(rows) == 8 and rows[0][5] == "1.00x" and rows[4][5] == "1.00x"
    kl = {(row[0], row[1]): float(row[6].rstrip(" |")) for row in rows}
    assert kl["| float32", "TopKSampler"] == 0.0 and kl["| int8", "TopKSampler"] > 0.0


def test_train_batch_bench_tiny(tmp_path, tiny_model_path):
    """Global batch 1 against the default 8 (accumulation): the same samples, 1/8 of the updates."""
    stdout = _run(["bench/train_batch.py", "--model", "builtin:tiny-random-llama", "--samples", "9", "--epochs", "1",
                   "--max-length", "64"], tmp_path)
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    assert [(r["global_batch"], r["steps"]) for r in rows] == [(1, 9), (8, 2)]
    assert rows[0]["set_loss_before"] == rows[1]["set_loss_before"] and all(r["set_loss_after"] for r in rows)


def test_small_card_bench_dry_run(tmp_path):
    """The GPU run needs vLLM; what runs here: its settings, commands and table."""
    stdout = _run(["bench/small_card.py", "--dry-run", "--total-gib", "140", "--tokenizer-from", str(tmp_path)],
                  tmp_path)
    server = next(line for line in stdout.splitlines() if line.startswith("server: "))
    assert "--enable-sleep-mode" in server and "--quantization bitsandbytes" in server
    assert "--gpu-memory-utilization 0.1 " in server  # 14 of 140 GiB
    assert '"training.gpu_memory_fraction": 0.1643' in stdout  # (24 - 1) / 140
    sys.path.insert(0, str(REPO / "bench"))
    from small_card import phase_note, table, training_fraction

    assert training_fraction(24, 2.5, 140) == round(21.5 / 140, 4)
    rows = [{"phase": "training", "in_use_gib": 23.5, "cap_gib": 24, "seconds": 80.0, "steps": 2,
             "train_fraction": 0.15, "train_max_allocated_gib": 12.25},
            {"phase": "awake", "in_use_gib": 13.9, "seconds": 2.5, "same_completion": True}]
    for row in rows:
        row["note"] = phase_note(row)
    assert table(rows).splitlines()[2:] == [
        "| training | 23.50 | 12.25 | 80.0 | 2 steps, fraction 0.15; device peak within the 24 GiB cap |",
        "| awake | 13.90 |  | 2.5 | wake 2.50 s; completion after wake == before |"]


def test_train_speed_bench_tiny(tmp_path):
    """The same samples at the same global batch cut two ways, one of them grouped by length, two adapters side by
    side."""
    stdout = _run(["bench/train_speed.py", "--shape", "tiny-llama", "--samples", "8", "--median", "40",
                   "--max-tokens", "96", "--configs", "1x8", "2x4+group+two", "--out", str(tmp_path / "rows.jsonl")],
                  tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["config"] for r in rows] == ["1x8", "2x4+group+two"] and not any("error" in r for r in rows)
    one, two = rows
    assert one["samples"] == two["samples"] == 8 and one["steps"] == two["steps"] == 1  # 8 samples, global batch 8
    assert two["tokens"] == 2 * one["tokens"] > 0  # two adapters on the same samples
    assert one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    assert "| 2x4+group+two | 8 |" in stdout and "tokens/s vs first" in stdout
    bad = subprocess.run([sys.executable, "bench/train_speed.py", "--configs", "8by1"], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert bad.returncode != 0 and "'8by1' is not BxA" in bad.stderr


def test_train_speed_profile_writes_where_the_steps_time_went(tmp_path):
    _run(["bench/train_speed.py", "--shape", "tiny-llama", "--samples", "48", "--median", "40", "--max-tokens", "96",
          "--configs", "1x2+prof"], tmp_path)
    text = (tmp_path / "profile-1x2+prof.txt").read_text()
    assert text.startswith("steps 3-4: wall ") and "aten::mm" in text  # two tables of the profiled steps' operators


def test_engine_start_bench_samples_every_server_process(tmp_path):
    """The server's start through slkit's own ManagedServer (here the fake vLLM of tests/fixtures), its processes'
    stacks sampled and summarised."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "fixtures" / "fake_vllm"), str(REPO)])}
    out = subprocess.run([sys.executable, "bench/engine_start.py", "--shape", "tiny-llama", "--interval", "0.3",
                          "--variants", "cold=a", "again=a,SLKIT_PROBE=1", "--workdir", str(tmp_path),
                          "--out", str(tmp_path / "rows.jsonl")], capture_output=True, text=True, cwd=REPO,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["cache"], r["env"]) for r in rows] == [("cold", "a", {}), ("again", "a", {"SLKIT_PROBE": "1"})]
    for row in rows:
        assert row["start_s"] > 0
        commands = " ".join(p["cmd"] for p in row["processes"])
        assert "server_guard.py" in commands and "vllm.entrypoints.cli.main serve" in commands  # guard and server
        assert all(s["seconds"] > 0 and s["frame"] for p in row["processes"] for s in p["stretches"])
    assert "| cold | a |" in out.stdout and "seconds to /health" in out.stdout
