"""The run's log: runs/<run>/slkit.log, what the CLI and every stage did, one line per event.

    with run_log("runs/demo") as log:
        log.info("iteration 1 drafts: start")

Stages run in notebook kernels, processes of their own: each process appends to the same file (opened in
append mode, so lines of different processes never overwrite each other), its pid on every line. Stage start
and end with the summary's counts (INFO), warnings shown while a stage runs (WARNING), errors with their
traceback (ERROR). No secrets: lines hold stage names, counts and file names, never params (an endpoint's key
is named there) nor environment variables.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

from slkit.running.layout import log_path

LOGGER = "slkit"
LINE_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(message)s"


@contextlib.contextmanager
def run_log(run_dir: str | Path) -> Iterator[logging.Logger]:
    """The `slkit` logger writing to runs/<run>/slkit.log while the block runs, warnings shown meanwhile
    included; a block inside another for the same run writes each line once."""
    logger = logging.getLogger(LOGGER)
    path = log_path(run_dir).resolve()
    if any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        yield logger
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    handler.setLevel(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    shown = warnings.showwarning

    def show_and_log(message, category, filename, lineno, file=None, line=None):
        logger.warning("%s: %s (%s:%s)", category.__name__, message, Path(filename).name, lineno)
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show_and_log  # warnings are still shown where they were (notebook, terminal)
    try:
        yield logger
    finally:
        warnings.showwarning = shown
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def counts(summary: Any, prefix: str = "", depth: int = 2) -> str:
    """The numbers of a stage summary as `key=value` pairs (nested keys joined with dots, `depth` levels):
    what the log records of a finished stage."""
    if not isinstance(summary, dict):
        return ""
    pairs = []
    for key, value in summary.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            pairs.append(f"{prefix}{key}={value}")
        elif isinstance(value, dict) and depth > 1:
            nested = counts(value, f"{prefix}{key}.", depth - 1)
            if nested:
                pairs.append(nested)
    return " ".join(pairs)


def stage_label(iteration: int, stage: str) -> str:
    """How the log names one run of a stage: "iteration 2 drafts", "baseline evaluation", "length_control"."""
    if stage == "length_control":
        return f"length_control (after iteration {iteration})"
    return "baseline evaluation" if iteration == 0 else f"iteration {iteration} {stage}"
