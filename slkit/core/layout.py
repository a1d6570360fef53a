"""The run directory: where each iteration, stage, adapter and lock lives.

    runs/<run>/params.yaml            the params the run started with
    runs/<run>/environment.json       what it ran on; runs/<run>/slkit.log: what it did
    runs/<run>/baseline/              the untrained base model's evaluation (iteration 0)
    runs/<run>/iter_<k>/              macro-iteration k: every stage's records, adapters/<role>/, notebooks
    runs/<run>/length_control/        the final stage
"""
from __future__ import annotations

from pathlib import Path

from slkit.core.params import Params, load_params
from slkit.core.records import done_marker, read_document, read_json
from slkit.core.schema import DoneMarker

ROLES = ("generator", "extender")


BASELINE = 0  # the "iteration" of the untrained base model, evaluated before the first macro-iteration


def environment_path(run_dir: str | Path) -> Path:
    """runs/<run>/environment.json: what the run ran on (slkit.running.environment)."""
    return Path(run_dir) / "environment.json"


def log_path(run_dir: str | Path) -> Path:
    """runs/<run>/slkit.log: what the run did, from the CLI and every stage's kernel (slkit.core.logs)."""
    return Path(run_dir) / "slkit.log"


def iter_dir(run_dir: str | Path, iteration: int) -> Path:
    """runs/<run>/iter_<k>/, or runs/<run>/baseline/ for the base model's evaluation (iteration 0)."""
    return Path(run_dir) / ("baseline" if iteration == BASELINE else f"iter_{iteration}")


def adapter_dir(run_dir: str | Path, iteration: int, role: str) -> Path:
    return iter_dir(run_dir, iteration) / "adapters" / role


def current_adapters(run_dir: str | Path, iteration: int) -> dict[str, str | None]:
    """Adapters that generate in `iteration`: the previous iteration's, or None (base model) in iteration 1."""
    previous = {role: adapter_dir(run_dir, iteration - 1, role) for role in ROLES}
    return {role: str(p) if (p / "adapter_config.json").exists() else None for role, p in previous.items()}


def load_run_params(run_dir: str | Path) -> Params:
    """The params the run started with (runs/<run>/params.yaml). A process reads them once: a stage's notebook
    passes what it read to the stage, and the stage passes them on."""
    return load_params(Path(run_dir) / "params.yaml")


def stage_dir(run_dir: str | Path, iteration: int, stage: str) -> Path:
    """Where a stage writes: iter_<k>/, or length_control/ for the final stage."""
    return Path(run_dir) / "length_control" if stage == "length_control" else iter_dir(run_dir, iteration)


def lock_path(run_dir: str | Path, iteration: int, stage: str) -> Path:
    """Holds the PID of the process running a stage, so a resumed run can stop an orphaned kernel."""
    return stage_dir(run_dir, iteration, stage) / f"{stage}.lock"


def stage_summary(run_dir: str | Path, iteration: int, stage: str) -> dict:
    """A finished stage's summary, read from its done-marker ({} when the stage has none yet)."""
    marker = done_marker(stage_dir(run_dir, iteration, stage), stage)
    return read_document(marker, DoneMarker)["summary"] if marker.exists() else {}


def stage_done(run_dir: str | Path, iteration: int, stage: str) -> bool:
    """Whether the stage has finished: its done-marker exists, and the final stage's records that it ran
    after this iteration (a run resumed with more macro_iterations reruns it on the new last iteration)."""
    marker = done_marker(stage_dir(run_dir, iteration, stage), stage)
    # Only the marker's iteration is read here; whoever uses its summary reads it as its type.
    return marker.exists() and (stage != "length_control" or read_json(marker).get("iteration") == iteration)
