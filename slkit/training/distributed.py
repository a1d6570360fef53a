"""Training in other processes: on several GPUs of one host, `accelerate launch` runs slkit.training.adapters once
per process (ddp; fsdp and zero3 configs shipped untested; rank 0 writes the adapter); on one GPU, both adapters
can train at the same time, one process each (training.adapters_at_once)."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from slkit.core.params import Params, dump_params
from slkit.core.records import read_document
from slkit.core.schema import AdapterTrainingSummary
from slkit.engines.server_guard import die_with_parent

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped accelerate config (ddp, fsdp, zero3) or a user's file."""
    shipped = ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    path = shipped if shipped.exists() else Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"training.accelerate_config: {name_or_path!r} is neither a shipped config "
                         f"({', '.join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob('*.yaml')))}) nor a file")
    return path


def _command(params_file: Path, examples_path: str | Path, output_dir: Path, init_adapter: str | None) -> list[str]:
    return (["-m", "slkit.training.adapters", "--params", str(params_file), "--examples", str(examples_path),
             "--output", str(output_dir)] + (["--init-adapter", str(init_adapter)] if init_adapter else []))


def _die_with_parent() -> None:
    """In the child before it runs: on Linux, the kernel kills it (SIGKILL) when the process that started it dies
    in any way (a killed kernel or `slkit run` included), so no trainer outlives its stage; elsewhere nothing."""
    die_with_parent(signal.SIGKILL)


def train_at_once(params: Params, jobs: dict[str, tuple[str | Path, str | Path, str | None]]) -> dict[str, Any]:
    """Train several adapters at the same time, one process each: jobs maps a role to (examples, output dir,
    init adapter). Waits for all; a failed one raises with its role and exit status (the others still finish,
    so their adapters are kept for a rerun). Returns each role's summary."""
    started = {}
    failed = []
    try:
        for role, (examples_path, output_dir, init_adapter) in jobs.items():
            output_dir = Path(output_dir)
            params_file = output_dir.with_name(f".{output_dir.name}-params.yaml")
            params_file.parent.mkdir(parents=True, exist_ok=True)
            dump_params(params, params_file)
            command = [sys.executable, *_command(params_file, examples_path, output_dir, init_adapter)]
            started[role] = (subprocess.Popen(command, preexec_fn=_die_with_parent), params_file, output_dir, command)
        for role, (process, params_file, _, command) in started.items():
            if process.wait():
                failed.append(f"{role} (exit {process.returncode}): {' '.join(command)}")
            params_file.unlink(missing_ok=True)
    finally:  # interrupted (Ctrl-C, an exception): no training is left holding the GPU
        for process, *_ in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    if failed:
        raise RuntimeError("training at once failed for " + "; ".join(failed))
    return {role: read_document(output_dir / "slkit-train.json", AdapterTrainingSummary)
            for role, (_, _, output_dir, _) in started.items()}


def launch_distributed(params: Params, examples_path: str | Path, output_dir: str | Path,
                       init_adapter: str | None) -> dict[str, Any]:
    """Run train_adapter under `accelerate launch` with training.num_processes processes; its summary."""

    output_dir = Path(output_dir)
    config = accelerate_config_path(params.training.accelerate_config)
    params_file = output_dir.with_name(f".{output_dir.name}-params.yaml")
    params_file.parent.mkdir(parents=True, exist_ok=True)
    dump_params(params, params_file)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(params.training.num_processes),
               *_command(params_file, examples_path, output_dir, init_adapter)]
    done = subprocess.run(command)
    if done.returncode:
        raise RuntimeError(f"distributed training failed (exit {done.returncode}): {' '.join(command)}")
    params_file.unlink()
    return read_document(output_dir / "slkit-train.json", AdapterTrainingSummary)
