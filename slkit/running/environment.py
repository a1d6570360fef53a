"""What a run ran on: runs/<run>/environment.json, written by `slkit run` each time it starts a run.

    write_environment("runs/demo")   # python, packages, CUDA, GPUs, slkit's commit

Package versions come from their installed metadata (nothing heavy is imported: importing vllm alone takes
seconds), the GPUs from nvidia-smi (torch would create a CUDA context in the `slkit run` process, holding GPU
memory the stages need for the whole run). Nothing else of the machine is recorded: no host name, no
environment variables (they hold tokens and keys).
"""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from slkit.core.layout import environment_path
from slkit.core.records import read_json, write_json_atomic

# The packages whose versions change what a run computes, in the order the report shows them.
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "vllm", "bitsandbytes", "liger-kernel",
            "papermill")
SOURCE = Path(__file__).resolve().parents[2]  # the checkout slkit was imported from (a git work tree, or site-packages)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    """A command's stdout, or None where it is missing or fails (no git, no NVIDIA driver)."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def slkit_commit() -> dict[str, Any] | None:
    """The git commit of the slkit source that runs, and whether tracked files differ from it; None outside a
    git checkout (an installed wheel: its version says which slkit it is)."""
    if not (SOURCE / ".git").exists():
        return None
    commit = _run(["git", "rev-parse", "HEAD"], SOURCE)
    if commit is None:
        return None
    changed = _run(["git", "status", "--porcelain", "--untracked-files=no"], SOURCE)
    return {"commit": commit, "modified": bool(changed)}


def cuda_build() -> str | None:
    """The CUDA version torch was built with (None: a CPU build), read without starting CUDA."""
    return torch.version.cuda


def gpus() -> list[dict[str, Any]]:
    """Name, memory (MiB) and driver of each NVIDIA GPU, from nvidia-smi; [] without one."""
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"])
    found = []
    for line in (out or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "memory_mib": int(parts[1]) if parts[1].isdigit() else parts[1],
                          "driver": parts[2]})
    return found


def environment() -> dict[str, Any]:
    """The interpreter, the packages of PACKAGES (None: not installed), CUDA, GPUs and slkit's version and commit."""
    return {"python": platform.python_version(), "platform": platform.platform(), "executable": sys.executable,
            "packages": {name: package_version(name) for name in PACKAGES},
            "cuda": cuda_build(), "gpus": gpus(),
            "slkit": {"version": package_version("slkit"), "source": str(SOURCE), "git": slkit_commit()}}


def write_environment(run_dir: str | Path) -> dict[str, Any]:
    """Record this start's environment in runs/<run>/environment.json. A run resumed in another environment
    keeps the earlier ones under "earlier" (its records were made by both)."""
    path = environment_path(run_dir)
    now = environment()
    earlier: list[dict[str, Any]] = []
    if path.exists():
        old = read_json(path)
        earlier = old.pop("earlier", [])
        if {k: v for k, v in old.items() if k != "started_at"} != now:
            earlier.append(old)
    record = {**now, "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), **({"earlier": earlier} if earlier else {})}
    write_json_atomic(path, record)
    return record
