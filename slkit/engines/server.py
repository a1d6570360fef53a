"""One vLLM server per run (engine.backend: vllm, engine.vllm.server: true): started once, used by every stage.

    with managed_server(params, run_dir) as server:   # what `slkit run` and `slkit evaluate` do
        ...                                           # each stage: load_engine(params, adapters) -> ServerEngine

Starting a vLLM engine costs 20-140 s (weights, torch.compile, CUDA graphs), once per stage before; a run now pays
it once. `slkit run` starts `vllm serve` as a child on 127.0.0.1 before its first stage and stops it after the
last one, or when the run fails or gets Ctrl-C:

- the server: the recipe's engine.vllm settings (slkit.engines.vllm.engine_kwargs, the same as the in-process
  engine's), served under the name SERVED_MODEL, LoRA enabled from the baseline on (unloading an adapter frees no
  slot in vLLM 0.25.1: --max-cpu-loras holds every adapter of the run), runtime adapter loading
  (VLLM_ALLOW_RUNTIME_LORA_UPDATING) and the development endpoints /sleep and /wake_up (VLLM_SERVER_DEV_MODE,
  --enable-sleep-mode). Its output goes to runs/<run>/vllm_server.log. On several GPUs it runs data parallel
  (a model that fits one GPU's share) or tensor parallel (one that does not): parallel_layout.
- how stages find it: runs/<run>/engine.json (url, the process group, the model, who started it), written when it
  starts and removed when it stops. slkit.engines.load_engine reads it: a live server serves the stage through
  ServerEngine (the OpenAI-compatible endpoint engine, each iteration's adapters loaded under names of their
  paths, requests in flight to fill max_num_seqs); without one (a notebook run on its own in Jupyter) the stage
  starts an in-process vLLM engine as before.
- its life is the run's: it runs under a guard (slkit/engines/server_guard.py) that leads its own process group
  and takes the group down (the server's engine cores and workers too) when `slkit run` dies, kill -9 included;
  the next `slkit run` on the run directory also stops a server that engine.json names, before it starts its own.
- faults: a fixed port in use is refused naming engine.vllm.port (none fixed: a free port); a server that exits
  or does not answer /health within engine.vllm.start_timeout_s stops the run with its log's last lines; a server
  that dies during a stage fails the stage with the same (ServerGone), and the rerun starts a new one.
- training beside it: a stage that trains sleeps the server first (level 1: weights to CPU memory, KV cache
  freed; level 2 loses LoRA state in vLLM 0.25.1) and wakes it after, when engine.vllm.sleep_during_training says
  so (auto: when the server's share of the GPU is above 0.5); runs/<run>/engine_timings.jsonl times each.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

from slkit.core.params import EndpointParams, Params, ParamsError
from slkit.core.runlock import boot_id
from slkit.engines.base import log_engine_timing
from slkit.engines.endpoint import EndpointEngine
from slkit.engines.vllm import engine_kwargs
from slkit.models.loading import resolve_model_path

SERVED_MODEL = "slkit-base"  # the base model's served name: the same whatever model.path says
INFO_FILE = "engine.json"
LOG_FILE = "vllm_server.log"
GUARD = Path(__file__).with_name("server_guard.py")
REQUEST_TIMEOUT_S = 3600.0  # one request may decode 16k tokens in a full batch
STOP_WAIT_S = 40.0  # the guard's grace (20 s) and some
SLEEP_ABOVE_SHARE = 0.5  # sleep_during_training auto: a server holding more than this share leaves training too little
LOG_TAIL_LINES = 40


class ServerError(RuntimeError):
    """The run's server could not start, or stopped: the message holds the last lines of its log."""


class ServerGone(ServerError):
    """The run's server died while a stage used it."""


def log_tail(run_dir: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of runs/<run>/vllm_server.log."""
    try:
        text = (Path(run_dir) / LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# Where it runs: GPUs, parallel layout, port, command line


def visible_gpus() -> list[float]:
    """Memory (GiB) of each GPU this process may use (nvidia-smi, filtered by CUDA_VISIBLE_DEVICES); [] without
    one. Asked of nvidia-smi, not torch: a CUDA context in `slkit run` would hold memory on the first GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = {}
    for line in out.strip().splitlines():
        index, mib = (part.strip() for part in line.split(","))
        gpus[index] = float(mib) / 1024
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpus[i.strip()] for i in visible.split(",") if i.strip() in gpus]
    return list(gpus.values())


def model_gib(model_dir: str | Path, load_in_4bit: bool) -> float:
    """The model's weights in GPU memory, GiB: its weight files' size (a quarter in 4 bits, from 16)."""
    files = [p for pattern in ("*.safetensors", "*.bin") for p in Path(model_dir).glob(pattern)]
    size = sum(p.stat().st_size for p in files) / 2**30
    return size / 4 if load_in_4bit else size


def parallel_layout(params: Params, weights_gib: float, gpus: list[float]) -> tuple[int, int]:
    """(data_parallel_size, tensor_parallel_size) of the run's server. A param that is set wins; else a model whose
    weights take at most half of one GPU's share (gpu_memory_utilization; the rest holds the KV cache) gets one GPU
    per copy, a bigger one the fewest GPUs (a power of two) that hold it, and the copies fill the visible GPUs."""
    vp = params.engine.vllm
    count = max(len(gpus), 1)
    tp = vp.tensor_parallel_size
    if tp is None:
        if vp.data_parallel_size:
            tp = max(1, count // vp.data_parallel_size)
        else:
            share = min(gpus) * vp.gpu_memory_utilization if gpus else math.inf
            tp = next((n for n in (1, 2, 4, 8) if n <= count and weights_gib / n <= share / 2), count)
    dp = vp.data_parallel_size or max(1, count // tp)
    if gpus and dp * tp > len(gpus):
        raise ParamsError(f"engine.vllm.data_parallel_size ({dp}) x engine.vllm.tensor_parallel_size ({tp}) needs "
                          f"{dp * tp} GPUs; {len(gpus)} are visible (CUDA_VISIBLE_DEVICES)")
    return dp, tp


def port_for(params: Params) -> int:
    """engine.vllm.port when it is free on 127.0.0.1 (else a clear error), or a free port."""
    fixed = params.engine.vllm.port
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", fixed or 0))
        except OSError:
            raise ParamsError(f"engine.vllm.port: port {fixed} on 127.0.0.1 is in use; set another port, or leave "
                              "engine.vllm.port out to take a free one") from None
        return s.getsockname()[1]


def max_cpu_loras(params: Params) -> int:
    """Adapters the server keeps: every one the run loads (two per iteration, the final stage's, an evaluated one).
    Unloading frees no slot in vLLM 0.25.1, so the server never unloads (ServerEngine.close)."""
    return max(params.engine.vllm.max_loras, 2 * params.macro_iterations + 4)


# Tokens the server gathers into one streamed chunk: a stop_early check comes at most this many tokens late.
STREAM_INTERVAL_TOKENS = 16


def server_command(params: Params, model_dir: str, port: int, dp: int, tp: int) -> list[str]:
    """`vllm serve` with the recipe's engine settings (the in-process engine's: slkit.engines.vllm.engine_kwargs)."""
    kw = engine_kwargs(params, model_dir, with_lora=True)
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model_dir,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_MODEL,
            "--tokenizer", kw["tokenizer"], "--dtype", str(kw["dtype"]), "--seed", str(kw["seed"]),
            "--gpu-memory-utilization", str(kw["gpu_memory_utilization"]), "--max-num-seqs", str(kw["max_num_seqs"]),
            "--tensor-parallel-size", str(tp), "--data-parallel-size", str(dp),
            "--enable-prefix-caching" if kw["enable_prefix_caching"] else "--no-enable-prefix-caching",
            "--enable-lora", "--max-loras", str(kw["max_loras"]), "--max-lora-rank", str(kw["max_lora_rank"]),
            "--max-cpu-loras", str(max_cpu_loras(params)), "--enable-sleep-mode",
            # Every submitted request is streamed (slkit.engines.endpoint), so the server would send one event per
            # token of hundreds of texts at once; the stop_early checks read every 400 characters anyway.
            "--stream-interval", str(STREAM_INTERVAL_TOKENS),
            # One access-log line per request would bury the start-up lines the log is kept for.
            "--disable-uvicorn-access-log"]
    if kw["enforce_eager"]:
        argv.append("--enforce-eager")
    if "max_model_len" in kw:
        argv += ["--max-model-len", str(kw["max_model_len"])]
    if "quantization" in kw:
        argv += ["--quantization", kw["quantization"]]
    if "compilation_config" in kw:
        argv += ["--compilation-config", json.dumps(kw["compilation_config"])]
    if kw["trust_remote_code"]:
        argv.append("--trust-remote-code")
    return argv


def server_environment() -> dict[str, str]:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_SERVER_DEV_MODE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the in-process engine's setting; the server runs its own way
    return env


# engine.json: which server a run has


def read_info(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def live_server(run_dir: str | Path, model_path: str | None = None) -> dict[str, Any] | None:
    """The run's server from engine.json when it answers /health (and serves `model_path`), else None.
    Raises ServerGone when the `slkit run` that started it is alive but the server is not: a stage then fails
    with the reason instead of starting an engine of its own beside the run's."""
    info = read_info(run_dir)
    if not info or info.get("boot_id") != boot_id() or (model_path and info.get("model") != model_path):
        return None
    if healthy(info["url"]):
        return info
    if info.get("state") == "ready" and _alive(info["owner"]):
        raise ServerGone(gone_message(info, run_dir))
    return None


def gone_message(info: dict[str, Any], run_dir: str | Path) -> str:
    return (f"the run's vLLM server ({info['url']}, process group {info['pgid']}) stopped answering; the last lines "
            f"of {Path(run_dir) / LOG_FILE}:\n{log_tail(run_dir)}\nFinished records are kept: rerun the same command "
            "to resume (a new server starts).")


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def stop_group(pgid: int, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM to the group (its guard stops the server in order), SIGKILL to whatever is left after `wait_s`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_stale_server(run_dir: str | Path, log: logging.Logger | None = None) -> None:
    """Stop a server that engine.json names whose run is gone (a `slkit run` killed before its guard could act,
    or on a system without PR_SET_PDEATHSIG), and remove the file. Only processes of the named group that are the
    guard or vLLM are stopped: a group id reused by another program is left alone."""
    info = read_info(run_dir)
    if not info:
        return
    if info.get("boot_id") == boot_id() and not _alive(info.get("owner", -1)):
        ours = [pid for pid in group_members(info["pgid"]) if _is_server_process(pid)]
        if ours:
            if log:
                log.warning("stopping the server of an earlier run (process group %s)", info["pgid"])
            stop_group(info["pgid"], wait_s=10.0)
    if info.get("boot_id") != boot_id() or not _alive(info.get("owner", -1)):
        (Path(run_dir) / INFO_FILE).unlink(missing_ok=True)


def _is_server_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"server_guard" in cmdline or b"vllm" in cmdline


# The managed server


class ManagedServer:
    """The run's `vllm serve`, from `start` (returns once it answers /health) to `stop`."""

    def __init__(self, params: Params, run_dir: str | Path, log: logging.Logger | None = None):
        self.params, self.run_dir, self.log = params, Path(run_dir), log
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> ManagedServer:
        params, vp = self.params, self.params.engine.vllm
        stop_stale_server(self.run_dir, self.log)
        model_dir = resolve_model_path(params.model.path)
        dp, tp = parallel_layout(params, model_gib(model_dir, params.model.load_in_4bit), visible_gpus())
        port = port_for(params)
        command = server_command(params, model_dir, port, dp, tp)
        started = time.monotonic()
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as out:
            out.write(f"\n=== slkit: {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(command)}\n")
            out.flush()
            self.proc = subprocess.Popen([sys.executable, str(GUARD), str(os.getpid()), "--", *command],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=server_environment(), start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        self.info = {"url": url, "pgid": self.proc.pid, "owner": os.getpid(), "boot_id": boot_id(),
                     "model": params.model.path, "served_model": SERVED_MODEL, "data_parallel_size": dp,
                     "tensor_parallel_size": tp, "max_num_seqs": vp.max_num_seqs, "state": "starting",
                     "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        self._write_info()  # before it is ready: a run killed now leaves the next run a group to stop
        try:
            self._wait_ready(url, started + vp.start_timeout_s)
        except BaseException as err:  # Ctrl-C while it starts too: no server outlives a start that failed
            self.stop(f"start failed: {type(err).__name__}")
            raise
        start_s = round(time.monotonic() - started, 1)
        self.info["state"] = "ready"
        self._write_info()
        log_engine_timing(self.run_dir, "server_start", self.proc.pid, start_s=start_s, url=url,
                          data_parallel_size=dp, tensor_parallel_size=tp)
        if self.log:
            self.log.info("vLLM server ready at %s in %.1f s (process group %d, data parallel %d x tensor parallel "
                          "%d); its log: %s", url, start_s, self.proc.pid, dp, tp, self.run_dir / LOG_FILE)
        return self

    def _wait_ready(self, url: str, deadline: float) -> None:
        timeout_s = self.params.engine.vllm.start_timeout_s
        while not healthy(url, timeout=2.0):
            if self.proc.poll() is not None:
                raise ServerError(f"the run's vLLM server exited before it was ready; the last lines of "
                                  f"{self.run_dir / LOG_FILE}:\n{log_tail(self.run_dir)}")
            if time.monotonic() > deadline:
                raise ServerError(f"the run's vLLM server did not answer {url}/health within "
                                  f"engine.vllm.start_timeout_s={timeout_s:g} s; the last lines of "
                                  f"{self.run_dir / LOG_FILE}:\n{log_tail(self.run_dir)}")
            time.sleep(0.5)

    def check(self) -> None:
        """Raise ServerGone when the server has exited (between stages: the next one would find none)."""
        if self.proc is not None and (self.proc.poll() is not None or not healthy(self.info["url"])):
            raise ServerGone(gone_message(self.info, self.run_dir))

    def _write_info(self) -> None:
        path = self.run_dir / INFO_FILE
        path.with_suffix(".tmp").write_text(json.dumps(self.info, indent=1))
        path.with_suffix(".tmp").replace(path)

    def stop(self, reason: str = "run ended") -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        stop_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if (read_info(self.run_dir) or {}).get("pgid") == proc.pid:
            (self.run_dir / INFO_FILE).unlink(missing_ok=True)
        log_engine_timing(self.run_dir, "server_stop", proc.pid, reason=reason)

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.stop("run ended" if kind is None else f"run stopped: {kind.__name__}")


def wants_server(params: Params) -> bool:
    return params.engine.backend == "vllm" and params.engine.vllm.server


@contextlib.contextmanager
def managed_server(params: Params, run_dir: str | Path, needed: bool = True,
                   log: logging.Logger | None = None) -> Iterator[ManagedServer | None]:
    """The run's server for the body when the recipe wants one and `needed` (work is left); None otherwise. A
    server an earlier run left is stopped either way."""
    stop_stale_server(run_dir, log)
    if not (needed and wants_server(params)):
        yield None
        return
    with ManagedServer(params, run_dir, log) as server:
        yield server


# Stages on the server


class ServerEngine(EndpointEngine):
    """The endpoint engine on the run's server: the completions API with prompts rendered here (pre-fills work),
    vLLM's sampling fields, adapters loaded at runtime and kept (unloading frees no slot), max_num_seqs requests in
    flight per copy of the model. A request that fails because the server is gone raises ServerGone with its log."""

    def __init__(self, params: Params, adapters: dict[str, str | None] | None, info: dict[str, Any]):
        self.info, self.run_dir = info, params.run_dir
        self._opened = (time.monotonic(), server_counters(info["url"]))
        endpoint = EndpointParams(base_urls=[f"{info['url']}/v1"], api="completions", model=info["served_model"],
                                  adapters="load", vllm_sampling=True, timeout_s=REQUEST_TIMEOUT_S, max_retries=1,
                                  concurrency=info["max_num_seqs"] * info["data_parallel_size"])
        served = params.model_copy(update={"engine": params.engine.model_copy(
            update={"backend": "openai", "endpoint": endpoint})})
        try:
            super().__init__(served, adapters)
        except Exception:
            self._raise_if_gone()
            raise

    def _raise_if_gone(self) -> None:
        if not healthy(self.info["url"]):
            raise ServerGone(gone_message(self.info, self.run_dir)) from None

    def _send(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._send(*args, **kwargs)
        except Exception:
            self._raise_if_gone()
            raise

    def close(self) -> None:
        for client in self.clients:  # the adapters stay loaded: the next stage may use them again
            client.close()
        opened, before = self._opened
        after = server_counters(self.info["url"])
        if "generation_tokens" in before and "generation_tokens" in after:  # one stage at a time uses the server
            log_engine_timing(self.run_dir, "served", os.getpid(), generate_s=round(time.monotonic() - opened, 1),
                              generated_tokens=int(after["generation_tokens"] - before["generation_tokens"]))


# vLLM's Prometheus counters (GET /metrics) a stage's tokens are read from, and the names slkit gives them
COUNTERS = {"vllm:generation_tokens_total": "generation_tokens", "vllm:prompt_tokens_total": "prompt_tokens",
            "vllm:request_success_total": "requests"}


def server_counters(url: str) -> dict[str, float]:
    """The server's COUNTERS now, each summed over its label sets (models, finish reasons); {} when it does not
    answer: a measurement only."""
    try:
        text = httpx.get(url.rstrip("/") + "/metrics", timeout=5.0).raise_for_status().text
    except httpx.HTTPError:
        return {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name = COUNTERS.get(line.split("{", 1)[0].split(" ", 1)[0])
        if name:
            with contextlib.suppress(ValueError):
                counters[name] = counters.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return counters


def server_engine(params: Params, adapters: dict[str, str | None] | None) -> ServerEngine | None:
    """An engine on the run's live server for `params` (vllm backend, server on, same model), or None."""
    if not wants_server(params):
        return None
    info = live_server(params.run_dir, params.model.path)
    return ServerEngine(params, adapters, info) if info else None


# Training beside the server


def sleeps_for_training(params: Params) -> bool:
    mode = params.engine.vllm.sleep_during_training
    return mode == "always" or (mode == "auto" and params.engine.vllm.gpu_memory_utilization > SLEEP_ABOVE_SHARE)


@contextlib.contextmanager
def asleep_for_training(params: Params, run_dir: str | Path, stage: str) -> Iterator[bool]:
    """The body (a stage's training) runs with the run's server asleep (level 1) when sleeps_for_training, and the
    server is woken after; yields whether it slept. Without a live server the body just runs."""
    info = live_server(run_dir, params.model.path) if wants_server(params) else None
    if not info or not sleeps_for_training(params):
        yield False
        return
    _call(info, run_dir, "/sleep?level=1", "sleep", reason=stage)
    try:
        yield True
    except BaseException:
        with contextlib.suppress(ServerError):  # the body's error is the one to see
            _call(info, run_dir, "/wake_up", "wake", reason=stage)
        raise
    _call(info, run_dir, "/wake_up", "wake", reason=stage)


def _call(info: dict[str, Any], run_dir: str | Path, path: str, event: str, reason: str) -> None:
    started = time.monotonic()
    try:
        httpx.post(info["url"] + path, timeout=REQUEST_TIMEOUT_S).raise_for_status()
    except httpx.HTTPError as err:
        raise ServerError(f"the run's vLLM server refused {path} ({err}); the last lines of "
                          f"{Path(run_dir) / LOG_FILE}:\n{log_tail(run_dir)}") from None
    log_engine_timing(run_dir, event, info["pgid"], seconds=round(time.monotonic() - started, 2), reason=reason)
