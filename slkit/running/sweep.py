"""`slkit sweep`: one run of a recipe for each combination of grid values, then the `slkit compare` report of them.

    slkit sweep params/smoke.yaml --grid training.learning_rate=1e-4,2e-4 --grid seed=0,1 --gpus 0,1

Each run is `slkit run RECIPE --set KEY=VALUE ...` in a subprocess of its own, named after its grid values
(runs/smoke--learning_rate-0.0001--seed-1), so the same command again resumes every run where it stopped and
`slkit run` skips what a run has finished. Without --gpus the runs go one at a time; with --gpus a queue of
free GPUs hands each run one (CUDA_VISIBLE_DEVICES), so as many run at once as there are GPUs. A failed run is
reported and the others go on. The sweep directory (runs/<run_name>--sweep/, or --out) gets sweep.json (every
run, its grid values and status), one log per run, and compare's summary.md, summary.csv and figures of the
runs that finished.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, get_args, get_origin

from pydantic import BaseModel

from slkit.core.params import Params, ParamsError, load_params, parse_overrides
from slkit.core.records import write_json_atomic
from slkit.evaluation.reports import compare_runs, markdown_table
from slkit.models.loading import resolve_model_path
from slkit.running.pipeline import ensure_kernel

# Directory names stay well below the 255 bytes of most filesystems; longer names end in a hash of the values.
MAX_NAME = 120

# Starts `slkit run` for one run: (command, environment, log file) -> exit code.
Launcher = Callable[[list[str], dict[str, str], Path], int]


@dataclass(frozen=True)
class SweepRun:
    name: str  # its run_name: the recipe's run_name and its grid values
    overrides: dict[str, Any]  # its grid values, by dotted param key
    params: Params  # the params it runs with (recipe, --set, grid values, run_name)

    @property
    def run_dir(self) -> Path:
        return self.params.run_dir


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """`--grid KEY=V1,V2,...` pairs -> {dotted key: [values]}. The values are read by `--set`'s own parser
    (parse_overrides) as the items of a YAML flow list: 1e-4 is a float, [en, zh] one value."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ParamsError(f"--grid expects KEY=V1,V2, got {pair!r}")
        if key in grid:
            raise ParamsError(f"--grid {key} is given twice: list its values once, {key}=V1,V2")
        try:
            values = parse_overrides([f"{key}=[{text}]"])[key]
        except ParamsError as err:
            raise ParamsError(f"--grid {pair}: not a comma-separated list of values ({err})") from None
        if not values:
            raise ParamsError(f"--grid {key}: no values; give {key}=V1,V2")
        canonical = [json.dumps(v, sort_keys=True, default=str) for v in values]
        repeated = sorted({c for c in canonical if canonical.count(c) > 1})
        if repeated:
            raise ParamsError(f"--grid {key}: {', '.join(repeated)} given more than once")
        grid[key] = values
    return grid


def parse_gpus(text: str) -> list[str]:
    """`--gpus 0,1,3` -> ["0", "1", "3"]: the values of CUDA_VISIBLE_DEVICES, one per run at a time."""
    gpus = [g.strip() for g in text.split(",")]
    if not all(gpus) or len(set(gpus)) != len(gpus):
        raise ParamsError(f"--gpus expects distinct GPU ids separated by commas (e.g. 0,1), got {text!r}")
    return gpus


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The params section a field holds (EngineParams, or ModelParams of `ModelParams | None`), if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def param_keys(section: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key of the params (sections and their fields): what --grid and --set may name."""
    keys = []
    for name, field in section.model_fields.items():
        keys.append(prefix + name)
        inner = _section_of(field.annotation)
        if inner is not None:
            keys += param_keys(inner, f"{prefix}{name}.")
    return keys


def is_param(key: str, section: type[BaseModel] = Params) -> bool:
    """Whether dotted `key` names a param; a key inside a mapping param (quality.meta_words.en) counts, its
    value is checked when the run's params load."""
    head, _, rest = key.partition(".")
    field = section.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    inner = _section_of(field.annotation)
    if inner is not None:
        return is_param(rest, inner)
    return get_origin(field.annotation) is dict


def _check_grid_keys(recipe: str | Path, grid: dict[str, list[Any]], overrides: dict[str, Any]) -> None:
    if not grid:
        raise ParamsError("slkit sweep needs at least one --grid KEY=V1,V2")
    for key in grid:
        if key == "run_name":
            raise ParamsError("--grid run_name: the sweep names each run after its grid values; "
                              "--set run_name=NAME sets the first part of those names")
        if not is_param(key):
            close = difflib.get_close_matches(key, param_keys(), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; `slkit check {recipe}` lists them"
            raise ParamsError(f"--grid {key}: no such param{hint}")
        if key in overrides:
            raise ParamsError(f"--grid {key} is also given with --set: give its values in --grid only")


def _label(value: Any) -> str:
    """A grid value as part of a directory name: letters, digits, '_', '-', '.'; never '..'."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    text = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "-", text)).strip("-.")
    return text or "empty"


def run_names(base: str, combinations: list[dict[str, Any]]) -> list[str]:
    """Each combination's run_name: `base--key-value--key-value`, with a key's last part (learning_rate) where
    that names one grid key, its dotted path where two grid keys share it. Stable: the same grid gives the same
    names on every invocation, so a rerun finds its runs."""
    keys = list(combinations[0])
    last = [k.rsplit(".", 1)[-1] for k in keys]
    tags = [short if last.count(short) == 1 else key for key, short in zip(keys, last)]
    names = []
    for combination in combinations:
        name = base + "".join(f"--{tag}-{_label(combination[key])}" for tag, key in zip(tags, keys))
        if len(name) > MAX_NAME:
            digest = hashlib.sha1(json.dumps(combination, sort_keys=True, default=str).encode()).hexdigest()[:10]
            name = f"{name[:MAX_NAME - 12].rstrip('-.')}--{digest}"
        names.append(name)
    return names


def plan_sweep(recipe: str | Path, grid: dict[str, list[Any]], overrides: dict[str, Any] | None = None) -> list[SweepRun]:
    """The runs of a sweep, one per combination of the grid values (cartesian product, in the order the keys and
    values were given), each run's params validated as `slkit check` validates them; nothing is written."""
    overrides = dict(overrides or {})
    base = load_params(recipe, overrides)
    _check_grid_keys(recipe, grid, overrides)
    combinations = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    names = run_names(base.run_name, combinations)
    for name in {n for n in names if names.count(n) > 1}:
        same = [c for c, n in zip(combinations, names) if n == name]
        raise ParamsError(f"grid values {same} all give the run name {name}: make them differ in letters or digits")
    runs = []
    for name, combination in zip(names, combinations):
        try:
            params = load_params(recipe, {**overrides, **combination, "run_name": name})
        except ParamsError as err:
            values = " ".join(f"{key}={json.dumps(value, default=str)}" for key, value in combination.items())
            raise ParamsError(f"sweep run {name} (--grid values {values}): {err}") from None
        runs.append(SweepRun(name, combination, params))
    return runs


def run_command(recipe: str | Path, overrides: dict[str, Any], run: SweepRun) -> list[str]:
    """`slkit run RECIPE --set ...` for one run: the sweep's --set, the run's grid values, its run_name.
    Values go as JSON, which `slkit run` reads back (as YAML) to the same values."""
    sets = {**overrides, **run.overrides, "run_name": run.name}
    args = [arg for key, value in sets.items()
            for arg in ("--set", f"{key}={json.dumps(value, ensure_ascii=False, default=str)}")]
    return [sys.executable, "-m", "slkit", "run", str(recipe), "--no-progress", *args]


def launch_subprocess(command: list[str], env: dict[str, str], log: Path) -> int:
    """Run one `slkit run` to its end, its output appended to `log`; its exit code."""
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def _last_line(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def prepare_shared(runs: list[SweepRun]) -> None:
    """Runs started at the same moment would each register the Jupyter kernel and build a builtin model into the
    same cache entry; done once here before they start."""
    ensure_kernel()
    for path in sorted({run.params.model.path for run in runs}):
        resolve_model_path(path)


def run_sweep(recipe: str | Path, grid: dict[str, list[Any]], overrides: dict[str, Any] | None = None,
              gpus: list[str] | None = None, out: str | Path | None = None, launch: Launcher = launch_subprocess,
              report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every combination (one at a time, or one per GPU of `gpus` at once), then compare the finished runs.
    Returns what sweep.json holds: recipe, grid, set, gpus, runs (run_name, run_dir, overrides, status, ...),
    compare (the report's directory and figures, when a run finished)."""
    overrides = dict(overrides or {})
    runs = plan_sweep(recipe, grid, overrides)
    base = load_params(recipe, overrides)
    if gpus:
        wide = [r.name for r in runs if r.params.training.num_processes > 1
                or (r.params.engine.vllm.tensor_parallel_size or 1) > 1 or (r.params.engine.vllm.data_parallel_size or 1) > 1]
        if wide:
            raise ParamsError(f"--gpus gives each run one GPU, but {', '.join(wide)} need several "
                              "(training.num_processes, engine.vllm.tensor_parallel_size or data_parallel_size > 1): "
                              "leave out --gpus")
    sweep_dir = Path(out) if out else base.run_dir.with_name(f"{base.run_name}--sweep")
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "recipe": str(recipe), "grid": grid, "set": overrides, "gpus": gpus,
        "runs": [{"run_name": r.name, "run_dir": str(r.run_dir), "overrides": r.overrides, "status": "pending",
                  "log": str(sweep_dir / "logs" / f"{r.name}.log")} for r in runs],
    }
    lock = threading.Lock()

    def record(entry: dict[str, Any] | None = None, **fields: Any) -> None:
        """Update one run's entry and rewrite sweep.json, so it shows where a sweep stands while it runs."""
        with lock:
            (entry if entry is not None else state).update(fields)
            write_json_atomic(sweep_dir / "sweep.json", state)

    record()
    if gpus and len(gpus) > 1:
        prepare_shared(runs)
    free: queue.Queue[str | None] = queue.Queue()
    for gpu in gpus or [None]:
        free.put(gpu)

    stop = threading.Event()  # Ctrl-C: the runs not started yet are not started

    def execute(i: int) -> None:
        run, entry = runs[i], state["runs"][i]
        gpu = free.get()
        if stop.is_set():
            free.put(gpu)
            return
        env = dict(os.environ) if gpu is None else {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        record(entry, status="running", gpu=gpu)
        report(f"[{i + 1}/{len(runs)}] {run.name}: started" + (f" on GPU {gpu}" if gpu is not None else ""))
        start = time.monotonic()
        try:
            code = launch(run_command(recipe, overrides, run), env, Path(entry["log"]))
            error = "" if code == 0 else _last_line(Path(entry["log"]))
        except OSError as err:  # the command could not start
            code, error = None, str(err)
        finally:
            free.put(gpu)
        record(entry, status="done" if code == 0 else "failed", returncode=code,
               seconds=round(time.monotonic() - start, 1), **({"error": error} if error else {}))
        report(f"[{i + 1}/{len(runs)}] {run.name}: {entry['status']} in {entry['seconds']} s"
               + (f" (exit code {code}: {error}; log {entry['log']})" if code != 0 else ""))

    pool = ThreadPoolExecutor(max_workers=len(gpus or [None]))
    try:
        list(pool.map(execute, range(len(runs))))
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    finished = [r.run_dir for r, e in zip(runs, state["runs"]) if e["status"] == "done" and (r.run_dir / "params.yaml").is_file()]
    if finished:
        result = compare_runs(finished, sweep_dir)
        record(compare={"out": str(sweep_dir), "runs": [str(r) for r in finished], "figures": result["figures"]})
        report(markdown_table(result["summary"]).rstrip())
    failed = [e["run_name"] for e in state["runs"] if e["status"] != "done"]
    report(f"{len(runs) - len(failed)} of {len(runs)} runs finished" + (f"; failed: {', '.join(failed)}" if failed else "")
           + f"; sweep.json and the compare report in {sweep_dir}")
    return state
