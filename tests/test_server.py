"""The run's one vLLM server (slkit.engines.server) on a CPU: `vllm serve` is tests/fixtures/fake_vllm's stand-in,
started through the same launcher, command line and guard. The command lines and parallel layouts are unit tests;
the rest starts real processes: a server's life and faults, the whole smoke pipeline through it, a killed run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import FAKE_VLLM, REPO, free_port

from slkit.core.params import ParamsError, dump_params, load_params
from slkit.engines import Request, load_engine
from slkit.engines.server import (
    INFO_FILE,
    ManagedServer,
    ServerError,
    ServerGone,
    asleep_for_training,
    managed_server,
    parallel_layout,
    read_info,
    server_command,
    server_environment,
    stop_stale_server,
)

sys.path.insert(0, str(FAKE_VLLM))
from vllm.entrypoints.cli.main import serve_parser  # noqa: E402  the fake's flags: vLLM 0.25.1's names

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc: Linux"),
              pytest.mark.slow]  # servers and pipelines in processes: the full suite, not `make test-fast`


def _params(tmp_path, **overrides):
    return load_params(REPO / "params" / "smoke.yaml", {"engine.backend": "vllm", "output_dir": str(tmp_path / "runs"),
                                                         **overrides})


@pytest.fixture
def fake_serve(monkeypatch, tmp_path):
    """`vllm serve` is the fake for this test and the processes it starts; returns the fake's event log."""
    log = tmp_path / "fake_vllm.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_VLLM), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return log


def _events(log, event=None):
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [e for e in lines if event is None or e["event"] == event]


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, within=15.0):
    deadline = time.time() + within
    while time.time() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.2)
    return False


def _server_pids(log):
    """The fake server's pid, its "engine core" child's and its guard's (the process group's id), per start."""
    return [(e["pid"], e["core"], e["pgid"]) for e in _events(log, "serve")]


def _adapter(path: Path, rank=8) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank}))
    return str(path)


# Command lines and layouts


def test_the_server_command_carries_the_recipes_engine_settings(tmp_path):
    params = _params(tmp_path, **{"engine.vllm.max_model_len": 4096, "engine.vllm.enforce_eager": True,
                                  "engine.vllm.enable_prefix_caching": False, "engine.vllm.gpu_memory_utilization": 0.4,
                                  "engine.vllm.max_num_seqs": 64, "model.load_in_4bit": True, "training.lora_r": 24,
                                  "model.dtype": "bfloat16", "seed": 7, "macro_iterations": 3,
                                  "engine.vllm.compilation_config": {"cudagraph_capture_sizes": [1, 8, 64],
                                                                     "cudagraph_specialize_lora": False}})
    argv = server_command(params, "/models/m", 8123, dp=2, tp=1)
    assert argv[:5] == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/models/m"]
    args = serve_parser().parse_args(argv[3:])  # every flag is one vLLM 0.25.1 takes
    assert (args.host, args.port, args.served_model_name, args.dtype, args.seed) == ("127.0.0.1", 8123, "slkit-base",
                                                                                       "bfloat16", 7)
    assert (args.gpu_memory_utilization, args.max_num_seqs, args.max_model_len) == (0.4, 64, 4096)
    assert (args.tensor_parallel_size, args.data_parallel_size, args.quantization) == (1, 2, "bitsandbytes")
    assert args.enable_lora and args.max_loras == 2 and args.max_lora_rank == 32  # 24 -> the next rank vLLM serves
    assert args.max_cpu_loras >= 2 * 3 + 2  # every adapter of the run stays loaded: unloading frees no slot
    assert args.enable_sleep_mode and args.enforce_eager and not args.enable_prefix_caching
    assert args.stream_interval > 1 and args.disable_uvicorn_access_log  # streamed requests in chunks, a quiet log
    assert args.compilation_config == {"cudagraph_capture_sizes": [1, 8, 64], "cudagraph_specialize_lora": False}
    env = server_environment()
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1" and env["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("weights, gpus, set_params, layout", [
    (3.0, [141.0], {}, (1, 1)),                                 # 1.5B, one H200
    (3.0, [141.0, 141.0], {}, (2, 1)),                          # fits one GPU: a copy per GPU
    (15.0, [24.0, 24.0, 24.0, 24.0], {}, (2, 2)),               # 7B bf16 on 24 GB cards: two GPUs per copy
    (140.0, [80.0, 80.0, 80.0, 80.0], {}, (1, 4)),              # 70B on four 80 GB cards
    (3.0, [80.0] * 4, {"engine.vllm.tensor_parallel_size": 2}, (2, 2)),
    (3.0, [80.0] * 4, {"engine.vllm.data_parallel_size": 2}, (2, 2)),
    (3.0, [], {}, (1, 1)),                                      # no GPU seen (the fake server on a CPU)
])
def test_the_parallel_layout_follows_the_model_size_unless_a_param_sets_it(tmp_path, weights, gpus, set_params, layout):
    assert parallel_layout(_params(tmp_path, **set_params), weights, gpus) == layout


def test_a_layout_needing_more_gpus_than_visible_names_the_params(tmp_path):
    params = _params(tmp_path, **{"engine.vllm.tensor_parallel_size": 2, "engine.vllm.data_parallel_size": 2})
    with pytest.raises(ParamsError, match=r"engine.vllm.data_parallel_size \(2\) x engine.vllm.tensor_parallel_size "
                                          r"\(2\) needs 4 GPUs; 2 are visible"):
        parallel_layout(params, 3.0, [80.0, 80.0])


# A server's life and faults


def test_one_server_serves_base_and_adapters_sleeps_for_training_and_leaves_nothing(fake_serve, tmp_path):
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    generator = _adapter(tmp_path / "adapters" / "generator")
    with managed_server(params, params.run_dir) as server:
        info = read_info(params.run_dir)
        assert info["url"] == server.info["url"] and info["state"] == "ready" and info["owner"] == os.getpid()
        for _ in range(2):  # two stages: the adapter is loaded once, the server started once
            with load_engine(params, {"generator": generator}) as engine:
                assert type(engine).__name__ == "ServerEngine"
                base, tuned = engine.generate([Request(engine.render("Write about rivers."), role, 30, seed=1)
                                               for role in (None, "generator")], params.sampling)
                assert base and tuned and base != tuned  # each request went to its own model
                tokens = len(base.split()) + len(tuned.split())
        with asleep_for_training(params, params.run_dir, "training") as slept:
            assert slept and httpx.get(info["url"] + "/is_sleeping").json() == {"is_sleeping": True}
        assert httpx.get(info["url"] + "/is_sleeping").json() == {"is_sleeping": False}
    [(server_pid, core, group)] = _server_pids(fake_serve)
    assert _gone([server_pid, core, group]) and not (params.run_dir / INFO_FILE).exists()
    assert [e["event"] for e in _events(fake_serve) if e["event"] in ("load_lora_adapter", "sleep", "wake")] == [
        "load_lora_adapter", "sleep", "wake"]
    timings = [json.loads(line) for line in (params.run_dir / "engine_timings.jsonl").read_text().splitlines()]
    assert [t["event"] for t in timings] == ["server_start", "served", "served", "sleep", "wake", "server_stop"]
    assert timings[0]["start_s"] > 0 and timings[3]["seconds"] >= 0 and timings[3]["reason"] == "training"
    # each stage's engine logs the tokens the server generated while it was open (the server's /metrics)
    served = [t for t in timings if t["event"] == "served"]
    assert all(t["pid"] == os.getpid() and t["generate_s"] >= 0 for t in served)
    assert [t["generated_tokens"] for t in served] == [tokens, tokens]


@pytest.mark.parametrize("mode, share, sleeps", [("auto", 0.85, True), ("auto", 0.4, False), ("never", 0.85, False),
                                                 ("always", 0.3, True)])
def test_the_server_sleeps_for_training_as_the_params_say(fake_serve, tmp_path, mode, share, sleeps):
    params = _params(tmp_path, **{"engine.vllm.sleep_during_training": mode,
                                  "engine.vllm.gpu_memory_utilization": share})
    params.run_dir.mkdir(parents=True)
    with managed_server(params, params.run_dir):
        with asleep_for_training(params, params.run_dir, "training") as slept:
            assert slept == sleeps
    assert len(_events(fake_serve, "sleep")) == len(_events(fake_serve, "wake")) == int(sleeps)


def test_a_busy_fixed_port_is_refused_naming_the_param(fake_serve, tmp_path):
    params = _params(tmp_path, **{"engine.vllm.port": free_port()})
    params.run_dir.mkdir(parents=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", params.engine.vllm.port))
        taken.listen()
        with pytest.raises(ParamsError, match=f"engine.vllm.port: port {params.engine.vllm.port} on 127.0.0.1 is in use"):
            ManagedServer(params, params.run_dir).start()
    assert not _events(fake_serve, "serve")


def test_a_server_that_fails_to_start_raises_with_its_log(fake_serve, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SERVE_FAIL", "CUDA out of memory while loading the weights")
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    started = time.time()
    with pytest.raises(ServerError, match="exited before it was ready(.|\n)*CUDA out of memory while loading"):
        ManagedServer(params, params.run_dir).start()
    assert time.time() - started < 30


def test_a_server_that_never_answers_times_out_with_its_log_and_is_stopped(fake_serve, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SERVE_HANG", "1")
    params = _params(tmp_path, **{"engine.vllm.start_timeout_s": 3})
    params.run_dir.mkdir(parents=True)
    with pytest.raises(ServerError, match=r"did not answer .*/health within engine.vllm.start_timeout_s=3 s"):
        ManagedServer(params, params.run_dir).start()
    [(server_pid, core, group)] = _server_pids(fake_serve)
    assert _gone([server_pid, core, group]) and not (params.run_dir / INFO_FILE).exists()


def test_a_server_that_dies_fails_the_request_with_its_log(fake_serve, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "2")
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    with managed_server(params, params.run_dir) as server:
        engine = load_engine(params, {})
        prompt = engine.render("Write about rivers.")
        engine.generate([Request(prompt, None, 10)], params.sampling)
        with pytest.raises(ServerGone, match="stopped answering(.|\n)*CUDA error: an illegal memory access(.|\n)*rerun"):
            engine.generate([Request(prompt, None, 10, seed=2)], params.sampling)
        with pytest.raises(ServerGone):  # the next stage of the run finds it gone too: no engine of its own
            load_engine(params, {})
        with pytest.raises(ServerGone):
            server.check()


def test_a_stale_server_of_a_killed_run_is_stopped_by_the_next_one(fake_serve, tmp_path):
    """A server whose run died without its guard acting (engine.json names its group, its owner is gone)."""
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    port = free_port()
    orphan = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "m", "--port", str(port)],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (params.run_dir / INFO_FILE).write_text(json.dumps({
        "url": f"http://127.0.0.1:{port}", "pgid": orphan.pid, "owner": dead.pid,
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(), "model": params.model.path,
        "state": "ready"}))
    deadline = time.time() + 30
    while not _events(fake_serve, "serve") and time.time() < deadline:
        time.sleep(0.2)
    [(server_pid, core, _)] = _server_pids(fake_serve)
    stop_stale_server(params.run_dir)
    orphan.wait(timeout=15)
    assert _gone([server_pid, core]) and not (params.run_dir / INFO_FILE).exists()


def test_streamed_completions_match_and_stop_when_the_client_leaves(fake_serve, tmp_path, monkeypatch):
    """The fake's streaming, which the early-stop code relies on: same text as without streaming, a word a chunk,
    and generation ends when the client disconnects (vLLM aborts the request)."""
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY", "0.05")
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    with managed_server(params, params.run_dir) as server:
        url, body = server.info["url"] + "/v1/completions", {"model": "slkit-base", "prompt": "Once", "seed": 3,
                                                             "max_tokens": 1000, "stop": ["."]}
        whole = httpx.post(url, json=body).json()["choices"][0]
        chunks = []
        with httpx.stream("POST", url, json={**body, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:])["choices"][0])
        assert "".join(c["text"] for c in chunks) == whole["text"] and len(chunks) > 3
        assert whole["finish_reason"] == chunks[-1]["finish_reason"] == "stop" and "." not in whole["text"]
        capped = httpx.post(url, json={**body, "max_tokens": 2, "stop": []}).json()["choices"][0]
        assert capped["finish_reason"] == "length" and len(capped["text"].split()) == 2
        with httpx.stream("POST", url, json={**body, "stop": [], "stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
        deadline = time.time() + 10
        while not _events(fake_serve, "aborted") and time.time() < deadline:
            time.sleep(0.1)
        [aborted] = _events(fake_serve, "aborted")
        assert aborted["sent"] < aborted["words"]


# Whole runs through the server


def _recipe(tmp_path, **overrides) -> Path:
    params = _params(tmp_path, **overrides)
    path = tmp_path / "vllm-smoke.yaml"
    dump_params(params, path)
    return path


@pytest.mark.slow
def test_the_smoke_pipeline_runs_on_one_server(fake_serve, tmp_path):
    from slkit.running.loop import run_loop

    run_dir = run_loop(_recipe(tmp_path), show_progress=False)
    assert (run_dir / "length_control" / "length_control.done.json").exists()
    assert len(_events(fake_serve, "serve")) == 1  # one server start for the whole run
    [(server_pid, core, group)] = _server_pids(fake_serve)
    assert _gone([server_pid, core, group]) and not (run_dir / INFO_FILE).exists()
    # every generating stage used it (no in-process engine: the fake vllm.LLM would have logged "start")
    assert not _events(fake_serve, "start") and len(_events(fake_serve, "completion")) > 50
    # it slept once around each training: two iterations' training stages and the final stage's
    assert len(_events(fake_serve, "sleep")) == len(_events(fake_serve, "wake")) == 3
    loaded = {e["path"] for e in _events(fake_serve, "load_lora_adapter")}
    assert str(run_dir / "iter_1" / "adapters" / "generator") in loaded
    assert str(run_dir / "length_control" / "adapters" / "generator") in loaded
    rerun = run_loop(_recipe(tmp_path), show_progress=False)  # all done: no server is started
    assert rerun == run_dir and len(_events(fake_serve, "serve")) == 1


@pytest.mark.slow
def test_a_server_dying_mid_stage_fails_the_run_with_the_reason_and_a_rerun_finishes(fake_serve, tmp_path, monkeypatch):
    from slkit.running.loop import run_loop

    recipe = _recipe(tmp_path, **{"macro_iterations": 1, "length_control.enabled": False})
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "12")  # during the baseline's benchmark answers
    with pytest.raises(RuntimeError, match="stage evaluation of iteration 0 failed: ServerGone(.|\n)*CUDA error"):
        run_loop(recipe, show_progress=False)
    [(server_pid, core, group)] = _server_pids(fake_serve)
    assert _gone([server_pid, core, group])  # the failed run left no server
    monkeypatch.delenv("FAKE_VLLM_DIE_AFTER")
    run_dir = run_loop(recipe, show_progress=False)
    assert (run_dir / "iter_1" / "evaluation.done.json").exists() and len(_events(fake_serve, "serve")) == 2


@pytest.mark.slow
def test_a_killed_run_leaves_no_server(fake_serve, tmp_path):
    """kill -9 of `slkit run` while its server is up: the guard takes the server's process group down."""
    recipe = _recipe(tmp_path)
    run = subprocess.Popen([sys.executable, "-m", "slkit", "run", str(recipe)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "smoke"
    deadline = time.time() + 240
    while time.time() < deadline and (read_info(run_dir) or {}).get("state") != "ready":
        assert run.poll() is None
        time.sleep(0.5)
    [(server_pid, core, group)] = _server_pids(fake_serve)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert _gone([server_pid, core, group])


@pytest.mark.slow
def test_slkit_evaluate_starts_and_stops_its_own_server(fake_serve, tmp_path, tiny_model_path):
    from slkit.running.cli import main

    recipe = _recipe(tmp_path)
    assert main(["evaluate", "--model", "builtin:tiny-random-llama", "--recipe", str(recipe), "--benchmark",
                 str(REPO / "tests" / "fixtures" / "longen_mini.jsonl"), "--subset", "4", "--no-judge",
                 "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert metrics["length_following"]["n"] == 8 and len(_events(fake_serve, "serve")) == 1
    assert _gone(list(_server_pids(fake_serve)[0])) and not (tmp_path / "eval" / INFO_FILE).exists()


def test_a_run_started_before_the_run_server_resumes(tmp_path):
    """A run directory whose params.yaml predates the server's params (tensor_parallel_size was 1, the other keys
    did not exist) resumes with them: the new keys take their defaults, the changed one is logged."""
    import yaml

    from slkit.running.pipeline import prepare_run

    recipe = _recipe(tmp_path)
    _, run_dir = prepare_run(recipe)
    snapshot = yaml.safe_load((run_dir / "params.yaml").read_text())
    vllm = snapshot["engine"]["vllm"]
    for key in ("server", "port", "start_timeout_s", "sleep_during_training", "data_parallel_size"):
        del vllm[key]
    vllm["tensor_parallel_size"] = 1
    del snapshot["training"]["gpu_memory_fraction"]
    (run_dir / "params.yaml").write_text(yaml.safe_dump(snapshot))
    prepare_run(recipe)
    assert "engine.vllm.tensor_parallel_size" in (run_dir / "params_changes.log").read_text()


def test_submitted_requests_stream_stop_early_and_are_abandoned_on_the_server(fake_serve, tmp_path, monkeypatch):
    """The jobs' path (slkit.engines.jobs): a submitted request is streamed and gives the text generate gives; its
    stop_early check ends it on the server (the fake logs the abort); abandon() ends one in flight."""
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY", "0.05")  # the fake writes 20-60 words: 1-3 s a request
    monkeypatch.setattr("slkit.engines.endpoint.STOP_EARLY_EVERY_CHARS", 60)
    params = _params(tmp_path)
    params.run_dir.mkdir(parents=True)
    sampling = params.sampling.model_copy(update={"stop": [], "trim_unfinished": False})
    with managed_server(params, params.run_dir), load_engine(params, {}) as engine:
        request = Request(engine.render("Write about rivers."), None, 400, seed=5)
        [whole] = engine.generate([request], sampling)
        assert engine.submit(request, sampling).result() == whole and len(whole) > 120
        checked = []
        early = Request(request.prompt, None, 400, seed=5, stop_early=lambda text: checked.append(len(text)) or True)
        stopped = engine.submit(early, sampling).result()
        assert stopped.stopped_early and not stopped.cut and whole.startswith(stopped) and len(stopped) < len(whole)
        assert checked == [len(stopped)] and len(stopped) >= 60  # checked once 60 characters had come
        slow = Request(request.prompt, None, 400, seed=6)
        future = engine.submit(slow, sampling)
        time.sleep(0.3)  # a few of its words
        engine.abandon([future])
        assert future.result(timeout=10) == ""
    deadline = time.time() + 10
    while len(_events(fake_serve, "aborted")) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(_events(fake_serve, "aborted")) == 2
