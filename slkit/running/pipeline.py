"""How `slkit run` runs the loop's stages (slkit.running.loop): the run's setup, resume, locks, the run's server
and the notebooks executed with papermill.

Before the first stage, the recipe is checked (check_inputs: params, exemplar and benchmark files) and the run
directory made: runs/<run>/params.yaml (the params the run started with), environment.json, slkit.log.
Each stage is its notebook executed into its directory (runs/<run>/iter_<k>/, baseline/, length_control/);
a stage whose done-marker exists is skipped, so a rerun continues where the last one stopped.
One run directory, one run: the run holds runs/<run>/run.lock (slkit.core.runlock) from before it
writes params.yaml to its end; a second `slkit run` on the same directory is refused. With engine.backend vllm
the run starts one `vllm serve` before its first stage and stops it after its last (slkit.engines.server).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import papermill as pm
import yaml
import zmq
from ipykernel.kernelspec import install as install_kernel
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from tqdm.auto import tqdm
from traitlets.config import Config

from slkit.core.layout import lock_path, stage_dir, stage_done
from slkit.core.logs import run_log, stage_label
from slkit.core.params import Params, ParamsError, dump_params, load_params, params_from_dict
from slkit.core.records import RecordFileError
from slkit.core.registry import BY_NAME
from slkit.core.runlock import boot_id, hold_run_dir
from slkit.engines.server import managed_server
from slkit.evaluation.benchmarks import load_benchmark, locate_benchmark
from slkit.method.exemplars import load_exemplars
from slkit.models.loading import resolve_model_path
from slkit.running.environment import write_environment
from slkit.running.kernels import KernelsAhead
from slkit.training.trainer import unavailable_integrations

KERNEL_NAME = "slkit"
# Keys a resumed run may change: how much is done, how memory is spent (what an out-of-memory
# message asks to lower), and where training metrics are reported (it changes no record).
# Every change is logged in params_changes.log.
RESUMABLE_KEYS = {"macro_iterations", "engine.batch_size", "engine.device", "training.max_length",
                  "training.batch_size", "training.gradient_accumulation", "training.activation_offload",
                  "training.mlp_tile_tokens", "training.liger_kernels",
                  "training.gradient_checkpointing", "training.save_steps", "training.report_to",
                  "training.gpu_memory_fraction", "training.num_processes", "training.adapters_at_once",
                  "engine.vllm.server", "engine.vllm.port", "engine.vllm.compilation_config",
                  "engine.vllm.start_timeout_s", "engine.vllm.sleep_during_training",
                  "engine.vllm.gpu_memory_utilization", "engine.vllm.max_num_seqs",
                  "engine.vllm.tensor_parallel_size", "engine.vllm.data_parallel_size"}


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "notebooks"


def ensure_kernel() -> str:
    """Register this interpreter as the `slkit` Jupyter kernel (inside the environment), once."""
    def current() -> str | None:
        try:
            return KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv[0]
        except NoSuchKernel:
            return None

    if current() != sys.executable:
        install_kernel(kernel_name=KERNEL_NAME, display_name="Python (slkit)", prefix=sys.prefix)
        if current() != sys.executable:
            raise RuntimeError(f"a Jupyter kernel named {KERNEL_NAME!r} outside this environment shadows "
                               f"slkit's; remove it with: jupyter kernelspec remove {KERNEL_NAME}")
    return KERNEL_NAME


def absolute_paths(params: Params, base: Path) -> Params:
    """Resolve relative file paths of the params against `base`, so notebooks see the same files."""
    def resolve(p: str) -> str:
        return str((base / p).resolve()) if p and not Path(p).expanduser().is_absolute() else p

    model_path = params.model.path
    if model_path.startswith((".", "/", "~")) or (base / model_path).is_dir():
        model_path = resolve(model_path)
    return params.model_copy(update={
        "output_dir": resolve(params.output_dir),
        "model": params.model.model_copy(update={"path": model_path}),
        "queries": params.queries.model_copy(update={"exemplar_files": [resolve(p) for p in params.queries.exemplar_files]}),
        "evaluation": params.evaluation.model_copy(update={"benchmark": _benchmark_source(params.evaluation.benchmark, base)}),
    })


def _benchmark_source(source: str | None, base: Path) -> str | None:
    """A builtin or local benchmark as an absolute file path (relative to `base`), a hub id as it is."""
    return locate_benchmark(source, base) if source else None


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def with_current_defaults(snapshot: Any, source: str = "<dict>") -> Any:
    """A run's params.yaml as this slkit reads it: keys added to slkit after the run started take their
    defaults, which is what the run did before they existed (a new key's default keeps the old behaviour).
    Without this, a run moved to a newer slkit is refused for keys that nobody changed. A snapshot this
    slkit cannot read (a key removed) is compared as written, so those keys show as changed; a renamed key
    (slkit.core.params.RENAMED_KEYS) is read under its new name."""
    try:
        return params_from_dict(snapshot, source).to_dict()
    except ParamsError:
        return snapshot


def changes_since(snapshot: Path, params: Params) -> tuple[list[str], list[str]]:
    """(every key that differs, the keys among them a resume may not change) between a params snapshot written
    earlier (a run's params.yaml, an evaluation's evaluate.yaml) and `params`; keys added to slkit since the
    snapshot count as their defaults (with_current_defaults)."""
    old = with_current_defaults(yaml.safe_load(snapshot.read_text(encoding="utf-8")), str(snapshot))
    changed = changed_keys(old, params.to_dict())
    return changed, [k for k in changed if k not in RESUMABLE_KEYS]


def check_inputs(params_path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Validate params and read the data files they name; nothing is written."""
    try:
        params = absolute_paths(load_params(params_path, overrides), Path.cwd())
    except RecordFileError as err:  # a benchmark that is neither a builtin, a file nor a hub id
        raise ParamsError(f"{params_path}: evaluation.benchmark: {err}") from None
    benchmark = params.evaluation.benchmark
    for key, path in [(f"queries.exemplar_files.{i}", p) for i, p in enumerate(params.queries.exemplar_files)]:
        if path and not Path(path).is_file():
            raise ParamsError(f"{params_path}: {key}: file {path} does not exist")
    model_dir = Path(params.model.path).expanduser()
    # Exemplar and benchmark files are read now, so a broken line stops the run before any model loads.
    if model_dir.is_dir() and not (model_dir / "config.json").is_file():
        raise ParamsError(f"{params_path}: model.path: {model_dir} has no config.json: not a transformers model directory")
    load_exemplars(params.queries.exemplar_files)
    if benchmark:
        load_benchmark(benchmark, params.evaluation.benchmark_format)
    if params.training.report_to != "none":  # else training would fail on it after hours of generation
        missing = unavailable_integrations(params.training.report_to)
        if missing:
            raise ParamsError(f"{params_path}: training.report_to: {', '.join(missing)} not installed "
                              f"(pip install {' '.join(missing)}), or set training.report_to: none")
    return params


def make_run_dir(params: Params, params_path: str | Path) -> Path:
    """Create runs/<run>/ (and nothing in it), so its run lock can be taken before anything is written."""
    try:
        params.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ParamsError(f"{params_path}: output_dir: cannot write {params.run_dir} ({err.strerror})") from None
    return params.run_dir


def write_run_params(params: Params, params_path: str | Path) -> Path:
    """Write runs/<run>/params.yaml; a run dir started with other params is refused (resource keys
    may change, logged in params_changes.log). Call it holding the run lock."""
    run_dir = params.run_dir
    snapshot = run_dir / "params.yaml"
    changed: list[str] = []
    if snapshot.exists():
        changed, refused = changes_since(snapshot, params)
        # The final stage runs after every iteration: its params cannot change finished work.
        diff = [k for k in refused if k.split(".")[0] != "length_control"]
        if diff:
            raise ParamsError(
                f"{run_dir} was started with other params ({', '.join(diff)} differ); resuming would mix "
                f"results. Start a new run with another run_name (e.g. --set run_name={params.run_name}-2) "
                f"or delete {run_dir}.")
    try:
        dump_params(params, snapshot)
        if changed:
            with open(run_dir / "params_changes.log", "a", encoding="utf-8") as log:
                log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} resumed with changed {', '.join(changed)}\n")
    except OSError as err:
        raise ParamsError(f"{params_path}: output_dir: cannot write {run_dir} ({err.strerror})") from None
    return run_dir


def prepare_run(params_path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[Params, Path]:
    """Validate params, check the data files, create the run dir and its params snapshot (under the run lock)."""
    params = check_inputs(params_path, overrides)
    with hold_run_dir(make_run_dir(params, params_path)):
        return params, write_run_params(params, params_path)


def stop_orphaned_stage(lock: Path) -> None:
    """A kernel of a killed `slkit run` may still be running a stage: stop it before rerunning the stage.
    The lock holds "PID BOOT_ID"; a lock written on another machine or before a reboot names no process here
    (the number may be anyone's, this run's own included), so it is left alone."""
    try:
        pid, *written_on = lock.read_text().split()
        pid = int(pid)
        if written_on and written_on[0] != boot_id() or pid == os.getpid():
            return
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"ipykernel" not in cmdline and b"slkit" not in cmdline:
        return  # the PID now belongs to something else
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)


class ProgressPoller:
    """Mirrors the running stage's progress.json (slkit.core.records.Progress) into a tqdm bar: texts the engine
    finished of those expected, once there are any (they move within a record: an extension job is several),
    else records; the bar shows their rate and ETA, and the records done in its postfix."""

    def __init__(self, iter_path: Path, bar: Any):
        self.path, self.bar = iter_path / "progress.json", bar
        self._shown: tuple | None = None  # (stage, started, unit) the bar counts now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "ProgressPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()

    def _update(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        texts = state.get("texts", 0)
        unit, n, total = ("texts", texts, state["texts_expected"]) if texts else ("records", state["done"], state["total"])
        shown = (state["stage"], state.get("started"), unit)
        if shown != self._shown:  # a new stage, or its first text: rate and ETA start again
            self._shown = shown
            self.bar.reset(total=total)
            self.bar.set_description(f"  {state['stage']}", refresh=False)
            self.bar.unit = unit[:-1]
            # A resumed stage's records were done before it: the rate counts from there.
            self.bar.initial = self.bar.n = state["done"] if unit == "records" else 0
        self.bar.total = max(total, n)
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)
        self.bar.set_postfix_str(f"{state['done']}/{state['total']} records")

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._update()


def kernel_connection(socket_dir: str | Path) -> dict[str, str]:
    """How a notebook's kernel talks to papermill: Unix sockets in `socket_dir` (private, mode 0700),
    so no other local user can reach it as they could a TCP port; TCP on 127.0.0.1 where zmq has no ipc."""
    if zmq.has("ipc"):
        return {"transport": "ipc", "ip": str(Path(socket_dir) / "kernel")}
    return {"transport": "tcp", "ip": "127.0.0.1"}


# A kernel started ahead (slkit.running.kernels) answers papermill once the notebook's imports are done.
AHEAD_START_TIMEOUT_S = 600


def run_notebook(source: str | Path, executed: str | Path, parameters: dict[str, Any], kernel: str,
                 socket_dir: str | Path, km: Any = None) -> None:
    """Execute one notebook with papermill in `km`'s kernel (started ahead: slkit.running.kernels), or in a fresh
    kernel connected by `kernel_connection`."""
    ahead = {"km": km, "start_timeout": AHEAD_START_TIMEOUT_S} if km is not None else {}
    pm.execute_notebook(str(source), str(executed), parameters=parameters, kernel_name=kernel, progress_bar=False,
                        cwd=str(Path.cwd()), config=Config({"KernelManager": kernel_connection(socket_dir)}), **ahead)


@dataclass(frozen=True)
class Run:
    """A started run: its params (read once, from the recipe), its directory, its log and the private
    directory of its kernels' sockets."""
    params: Params
    dir: Path
    log: logging.Logger
    socket_dir: str


@contextmanager
def started_run(params_path: str | Path, overrides: dict[str, Any] | None = None) -> Iterator[Run]:
    """Check the recipe, hold the run directory (slkit.core.runlock: a second `slkit run` is refused), write its
    params.yaml and environment.json and open its log, for the block's stages; a block that raises is logged."""
    params = check_inputs(params_path, overrides)
    with hold_run_dir(make_run_dir(params, params_path)) as lock, \
            tempfile.TemporaryDirectory(prefix="slkit-kernels-") as socket_dir:  # created with mode 0700
        run_dir = write_run_params(params, params_path)
        with run_log(run_dir) as log:
            if lock.took_over:
                log.warning("took over the run lock of %s, which is no longer running", lock.took_over)
            env = write_environment(run_dir)
            log.info("slkit run %s: %d macro-iterations, model %s, engine %s; python %s, torch %s, transformers %s",
                     Path(params_path).name, params.macro_iterations, params.model.path, params.engine.backend,
                     env["python"], env["packages"]["torch"], env["packages"]["transformers"])
            try:
                yield Run(params, run_dir, log, socket_dir)
            except BaseException as err:
                log.error("run stopped: %s: %s", type(err).__name__, err)
                raise
            log.info("run finished")


def run_stages(run: Run, plan: list[tuple[int, str]], show_progress: bool = True) -> None:
    """Execute the notebook of every (iteration, stage) of `plan` in order, but those done before; the run's
    server (slkit.engines.server) lives around them when one is wanted and a stage is still to run."""
    kernel = ensure_kernel()
    resolve_model_path(run.params.model.path)  # build or convert a builtin model once, before any notebook
    todo = [(k, stage) for k, stage in plan if not stage_done(run.dir, k, stage)]
    with KernelsAhead(kernel, kernel_connection(run.socket_dir), Path.cwd()) as kernels:
        if todo:  # its imports run while the server starts
            kernels.start(notebooks_dir() / BY_NAME[todo[0][1]].notebook)
        with managed_server(run.params, run.dir, needed=bool(todo), log=run.log) as server:
            _run_plan(plan, todo, run.dir, run.socket_dir, kernel, server, show_progress, run.log, kernels)


def _run_plan(plan: list[tuple[int, str]], todo: list[tuple[int, str]], run_dir: Path, socket_dir: str, kernel: str,
              server: Any, show_progress: bool, log: logging.Logger, kernels: KernelsAhead) -> None:
    """Run `todo`, the steps of `plan` not done before (those are logged as skipped), in plan order."""
    stages_bar = tqdm(plan, desc="stages", disable=not show_progress, position=0)
    items_bar = tqdm(total=0, desc="  items", disable=not show_progress, position=1, leave=False)
    for k, stage in stages_bar:
        out = stage_dir(run_dir, k, stage)
        stages_bar.set_postfix_str(f"iter {k} {stage}")
        if stage_done(run_dir, k, stage):
            log.info("%s: done before, skipped", stage_label(k, stage))
            continue
        if server:
            server.check()  # a server that died after the last stage stops the run here, with its log
        out.mkdir(parents=True, exist_ok=True)
        stop_orphaned_stage(lock_path(run_dir, k, stage))
        source = notebooks_dir() / BY_NAME[stage].notebook
        executed = out / source.name
        log.info("%s: executing %s", stage_label(k, stage), executed.name)
        km = kernels.take(source)
        later = todo[todo.index((k, stage)) + 1:]
        if later:  # the next stage's kernel imports while this one runs
            kernels.start(notebooks_dir() / BY_NAME[later[0][1]].notebook)
        with ProgressPoller(out, items_bar):
            try:
                run_notebook(source, executed, {"run_dir": str(run_dir), "iteration": k}, kernel, socket_dir, km)
            except pm.PapermillExecutionError as err:
                raise RuntimeError(f"stage {stage} of iteration {k} failed: {err.ename}: {err.evalue}\n"
                                   f"see the executed notebook {executed}; rerun the same command to resume") from None
            finally:
                kernels.stop(km)
        if not stage_done(run_dir, k, stage):
            raise RuntimeError(f"notebook {executed} finished without writing {stage}.done.json")
    items_bar.close()
    stages_bar.close()
