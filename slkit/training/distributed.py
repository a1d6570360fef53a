"""Training on several GPUs of one host: `accelerate launch` runs slkit.training.adapters once per process
(ddp; fsdp and zero3 configs shipped untested); rank 0 writes the adapter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from slkit.core.params import Params, dump_params
from slkit.core.records import read_document
from slkit.core.schema import AdapterTrainingSummary

ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate_configs"


def accelerate_config_path(name_or_path: str) -> Path:
    """A shipped accelerate config (ddp, fsdp, zero3) or a user's file."""
    shipped = ACCELERATE_CONFIGS / f"{name_or_path}.yaml"
    path = shipped if shipped.exists() else Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"training.accelerate_config: {name_or_path!r} is neither a shipped config "
                         f"({', '.join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob('*.yaml')))}) nor a file")
    return path


def launch_distributed(params: Params, examples_path: str | Path, output_dir: str | Path,
                       init_adapter: str | None) -> dict[str, Any]:
    """Run train_adapter under `accelerate launch` with training.num_processes processes; its summary."""

    output_dir = Path(output_dir)
    config = accelerate_config_path(params.training.accelerate_config)
    params_file = output_dir.with_name(f".{output_dir.name}-params.yaml")
    dump_params(params, params_file)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_processes", str(params.training.num_processes),
               "-m", "slkit.training.adapters", "--params", str(params_file), "--examples", str(examples_path),
               "--output", str(output_dir)] + (["--init-adapter", str(init_adapter)] if init_adapter else [])
    done = subprocess.run(command)
    if done.returncode:
        raise RuntimeError(f"distributed training failed (exit {done.returncode}): {' '.join(command)}")
    params_file.unlink()
    return read_document(output_dir / "slkit-train.json", AdapterTrainingSummary)
