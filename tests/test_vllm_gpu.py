"""vLLM on a CUDA GPU: the VLLMEngine through slkit's own stages, per-role adapters in one batch, the run's one
managed `vllm serve` (slkit.engines.server: runtime adapters, sleep and wake, its death with its run), and
the endpoint engine against a real `vllm serve --enable-lora`. Skipped where vLLM or a GPU is missing
(CI and CPU machines); run on the GPU device as described in docs/benchmarks.md."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (GPU machines only)")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from conftest import free_port  # noqa: E402
from slkit.engines.base import Request  # noqa: E402
from slkit.core.layout import adapter_dir  # noqa: E402
from slkit.core.params import SamplingParams, load_params  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GREEDY = SamplingParams(temperature=0, stop=[])
VLLM_PARAMS = {"engine.backend": "vllm", "engine.vllm.enforce_eager": True, "engine.vllm.gpu_memory_utilization": 0.3,
               "engine.vllm.max_model_len": 2048, "model.dtype": "bfloat16",
               "training.lora_r": 16}  # the rank of small_model's adapters: vLLM serves up to training.lora_r


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A 2-layer random Llama with head_dim 64 (vLLM's attention kernels want it) and two random LoRAs."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from slkit.models.loading import train_small_tokenizer

    root = tmp_path_factory.mktemp("vllm")
    model_dir = root / "small-llama"
    tok = train_small_tokenizer(model_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(model_dir))
    adapters = {}
    for i, role in enumerate(["generator", "extender"]):
        torch.manual_seed(i + 1)
        base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        lora = get_peft_model(base, LoraConfig(r=16, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
        lora.save_pretrained(str(root / role))
        adapters[role] = str(root / role)
    return model_dir, adapters


def _params(model_dir, **overrides):
    return load_params(REPO / "params" / "smoke.yaml", {"model.path": str(model_dir), **VLLM_PARAMS, **overrides})


def _in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Like a notebook: one GPU phase per process, so vLLM's memory goes back when it ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    # stdout first: the phase a GPU check got to (vLLM's traceback alone fills stderr's tail)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-4000:]
    return done


def test_roles_share_one_batch_and_greedy_is_repeatable(small_model):
    from slkit.engines.vllm import VLLMEngine

    model_dir, adapters = small_model
    engine = VLLMEngine(_params(model_dir), adapters)
    prompt = engine.render("Write about rivers.")
    requests = [Request(prompt, role, 24) for role in (None, "generator", "extender")] * 2
    out = engine.generate(requests, GREEDY)
    assert out[:3] == out[3:]  # same request, same greedy text
    assert len(set(out[:3])) == 3  # base, Generator and Extender differ: each request got its own adapter
    # a pre-fill is continued: prompt + prefill as one raw text equals the prompt with the prefill appended
    [a] = engine.generate([Request(prompt, "generator", 8, prefill=out[1][:10])], GREEDY)
    [b] = engine.generate([Request(prompt + out[1][:10], "generator", 8)], GREEDY)
    assert a == b
    engine.close()


def test_stages_run_on_vllm_each_in_its_own_process(small_model, tmp_path):
    """seed -> generate -> extend (vLLM) -> train (transformers, GPU) -> iteration 2 generate with the
    trained Generator adapter (vLLM LoRA), each stage a fresh process as under papermill."""
    from slkit.running.pipeline import prepare_run
    from slkit.core.params import dump_params

    model_dir, _ = small_model
    params = _params(model_dir, output_dir=str(tmp_path / "runs"), run_name="vllm-stages")
    dump_params(params, tmp_path / "vllm.yaml")
    _, run_dir = prepare_run(tmp_path / "vllm.yaml")
    for iteration, stage in [(1, "queries"), (1, "drafts"), (1, "extensions"), (1, "training"), (2, "queries"), (2, "drafts")]:
        _in_fresh_process(f"from slkit.stages.{stage} import {stage}_stage; {stage}_stage({str(run_dir)!r}, {iteration})")
    for name in ["iter_1/queries.jsonl", "iter_1/drafts.jsonl", "iter_1/extensions.jsonl", "iter_2/drafts.jsonl"]:
        lines = (run_dir / name).read_text().splitlines()
        assert lines and all(json.loads(line) for line in lines), name
    assert (run_dir / "iter_1" / "adapters" / "generator" / "adapter_model.safetensors").exists()


def test_the_length_control_stage_runs_each_engine_in_a_child_process(small_model, tmp_path):
    """The final stage as papermill runs it, in one process, on vLLM at 85% of the free GPU per engine: the collection
    and the model rewrites in one child process, the adapter's training on the GPU in the stage process, the
    scoring in a second child. Each engine's process ends before the next GPU phase, so each finds the card
    free. (In session 4 a second engine in one process, after a slept one, crashed in profile_run.)"""
    import re
    import shutil

    from test_length_control_stage import _iteration

    from slkit.core.params import dump_params
    from slkit.running.pipeline import prepare_run

    model_dir, adapters = small_model
    # 85% of what is free now: an engine that an earlier test ran in this pytest process keeps its memory until
    # the process ends (VLLMEngine.close), which a stage's kernel never has.
    free_before, total = torch.cuda.mem_get_info()
    share = round(0.85 * free_before / total, 3)
    params = _params(model_dir, **{
        "output_dir": str(tmp_path / "runs"), "run_name": "vllm-length-control",
        "engine.vllm.gpu_memory_utilization": share, "queries.languages": ["en"],
        "length_control.rewrite": "model", "evaluation.benchmark": str(REPO / "tests" / "fixtures" / "longen_mini.jsonl")})
    dump_params(params, tmp_path / "vllm.yaml")
    _, run_dir = prepare_run(tmp_path / "vllm.yaml")
    _iteration(run_dir, 1)  # iteration 1's files, with the small model's Generator adapter
    shutil.rmtree(adapter_dir(run_dir, 1, "generator"))
    shutil.copytree(adapters["generator"], adapter_dir(run_dir, 1, "generator"))
    done = _in_fresh_process("import os; print('stage process', os.getpid(), flush=True); "
                             "from slkit.stages.length_control import length_control_stage; "
                             f"length_control_stage({str(run_dir)!r}, 1)")
    timings = [json.loads(line) for line in (run_dir / "engine_timings.jsonl").read_text().splitlines()]
    print(*timings, *[line for line in done.stdout.splitlines() if "length_control" in line], sep="\n")
    stage_pid = int(re.search(r"stage process (\d+)", done.stdout).group(1))
    ready = [t["pid"] for t in timings if t["event"] == "ready"]
    assert len(ready) == len(set(ready)) == 2 and stage_pid not in ready  # one engine per child, none in the stage
    # After training, before the scoring child: what training left in the stage process went back.
    free, _ = map(float, re.search(r"the score phase starts in a child process; GPU memory free: ([\d.]+) of "
                                   r"([\d.]+) GiB", done.stdout).groups())
    assert free >= share * total / 2**30
    closed = [t for t in timings if t["event"] == "closed"]
    metrics = json.loads((run_dir / "length_control" / "length_control.json").read_text())
    assert len(closed) == 2 and closed[0]["requests"] > 0 and closed[1]["requests"] > 0
    assert metrics["training"]["trained"] and metrics["length_after"]["n"] > 0


def test_endpoint_engine_loads_adapters_into_vllm_serve(small_model, tmp_path):
    from slkit.engines.endpoint import EndpointEngine

    model_dir, adapters = small_model
    port = free_port()
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                               "--port", str(port), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                               "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "2048"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        params = _params(model_dir, **{"engine.backend": "openai", "engine.endpoint.base_urls": [f"http://127.0.0.1:{port}/v1"],
                                       "engine.endpoint.model": str(model_dir)})
        engine = EndpointEngine(params, adapters)
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert {engine.models["generator"], engine.models["extender"]} <= {m["id"] for m in served["data"]}
        prompt = engine.render("Write about rivers.")
        out = engine.generate([Request(prompt, role, 24) for role in (None, "generator", "extender")], GREEDY)
        assert len(set(out)) == 3
        engine.close()
        served = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert engine.models["generator"] not in {m["id"] for m in served["data"]}  # unloaded on close
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)


def _server_params(model_dir, tmp_path, **overrides):
    return _params(model_dir, **{"output_dir": str(tmp_path / "runs"), "run_name": "vllm-server",
                                 "engine.vllm.sleep_during_training": "always", **overrides})


def test_the_run_server_loads_two_adapters_at_runtime_and_sleeps_and_wakes(small_model, tmp_path):
    """One managed `vllm serve` (slkit.engines.server): base model and two adapters loaded at runtime in one call,
    sleep level 1 frees GPU memory, greedy outputs are the same after wake (LoRA state kept), and the whole process
    group is gone after stop."""
    from slkit.engines import load_engine
    from slkit.engines.server import asleep_for_training, group_members, managed_server

    model_dir, adapters = small_model
    params = _server_params(model_dir, tmp_path)
    params.run_dir.mkdir(parents=True)
    with managed_server(params, params.run_dir) as server:
        group = server.info["pgid"]
        engine = load_engine(params, adapters)
        assert type(engine).__name__ == "ServerEngine"
        prompt = engine.render("Write about rivers.")
        requests = [Request(prompt, role, 24) for role in (None, "generator", "extender")]
        before = engine.generate(requests, GREEDY)
        assert len(set(before)) == 3  # base, Generator and Extender differ
        free_awake = _gpu_free_gib()
        with asleep_for_training(params, params.run_dir, "training") as slept:
            assert slept
            free_asleep = _gpu_free_gib()
        after = engine.generate(requests, GREEDY)
        print(f"GPU memory free with the server awake {free_awake:.1f} GiB, asleep {free_asleep:.1f} GiB")
        assert after == before and free_asleep > free_awake + 1  # its KV cache (0.3 of the card) went back
        engine.close()
    assert not group_members(group)
    timings = [json.loads(line) for line in (params.run_dir / "engine_timings.jsonl").read_text().splitlines()]
    print(*timings, sep="\n")
    assert [t["event"] for t in timings] == ["server_start", "sleep", "wake", "server_stop"]


def test_the_run_server_dies_with_its_run_killed(small_model, tmp_path):
    """kill -9 of the process that started the server: its guard takes vLLM's API server, engine core and workers
    down, and the GPU memory comes back."""
    from slkit.engines.server import group_members, read_info

    model_dir, _ = small_model
    params = _server_params(model_dir, tmp_path)
    params.run_dir.mkdir(parents=True)
    from slkit.core.params import dump_params

    dump_params(params, tmp_path / "server.yaml")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from slkit.core.params import load_params; from slkit.engines.server import managed_server\n"
        f"p = load_params({str(tmp_path / 'server.yaml')!r})\n"
        "with managed_server(p, p.run_dir):\n    print('ready', flush=True); time.sleep(100000)")],
        env=env, stdout=subprocess.PIPE, text=True)
    free_before = _gpu_free_gib()
    assert holder.stdout.readline().strip() == "ready"
    group = read_info(params.run_dir)["pgid"]
    assert len(group_members(group)) >= 3  # the guard, vLLM's API server, its engine core
    assert _gpu_free_gib() < free_before - 1
    holder.kill()
    holder.wait()
    deadline = time.time() + 90
    while group_members(group) and time.time() < deadline:
        time.sleep(1)
    assert not group_members(group) and _gpu_free_gib() > free_before - 1


def test_stages_run_on_the_run_server_and_training_sleeps_it(small_model, tmp_path):
    """The stages as `slkit run` runs them with the run's server, each in a fresh process: iteration 1's
    generation, training beside the sleeping server (its adapters then loaded at runtime), iteration 2's drafts."""
    from slkit.engines.server import managed_server
    from slkit.core.params import dump_params
    from slkit.running.pipeline import prepare_run

    model_dir, _ = small_model
    params = _server_params(model_dir, tmp_path)
    dump_params(params, tmp_path / "vllm.yaml")
    _, run_dir = prepare_run(tmp_path / "vllm.yaml")
    with managed_server(params, run_dir):
        for iteration, stage in [(1, "queries"), (1, "drafts"), (1, "extensions"), (1, "training"), (2, "queries"),
                                 (2, "drafts")]:
            _in_fresh_process(f"from slkit.stages.{stage} import {stage}_stage; {stage}_stage({str(run_dir)!r}, {iteration})")
    timings = [json.loads(line) for line in (run_dir / "engine_timings.jsonl").read_text().splitlines()]
    print(*timings, sep="\n")
    assert [t["event"] for t in timings] == ["server_start", "sleep", "wake", "server_stop"]  # no engine of its own
    assert (run_dir / "iter_2" / "drafts.jsonl").read_text().strip()
    assert "slkit-generator-" in (run_dir / "vllm_server.log").read_text()  # iteration 2's Generator was loaded


def _gpu_free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30
