"""The run's log: runs/<run>/slkit.log, what the CLI and every stage did, one line per event.

    with run_log("runs/demo") as log:
        log.info("iteration 1 drafts: start")

Stages run in notebook kernels, processes of their own: each process appends to the same file (opened in
append mode, so lines of different processes never overwrite each other), its pid on every line. Stage start
and end with the summary's counts (INFO), warnings shown while a stage runs (WARNING), errors with their
traceback (ERROR). No secrets: lines hold stage names, counts and file names, never params (an endpoint's key
is named there) nor environment variables.

Other packages' log records and warnings are not the user's to act on (bitsandbytes' "Failed to load CPU
gemm_4bit_forward from kernels-community" on `import peft`, on a CPU with AVX-512 BF16): while the command line
runs (`with library_output():`) they go to the run's slkit.log, held until a run log opens, and not to the
terminal. Their errors (ERROR and above) still reach the terminal, and so does all that was held when a command
stops on an unexpected exception.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

from slkit.core.layout import log_path

LOGGER = "slkit"
LINE_FORMAT = "%(asctime)s %(levelname)s [pid %(process)d] %(message)s"
LIBRARY_WARNINGS = "py.warnings"  # the logger other packages' warnings are written with (logging's own name for it)
HELD = 1000  # other packages' lines kept while no run log is open; the oldest go first
SLKIT_DIR = Path(__file__).resolve().parents[1]


class _LibraryLines(logging.Handler):
    """On the root logger while the command line runs: other packages' log records go to the open run log, or are
    held until one opens; slkit's own are left to the run log's handler (or, with none open, to the terminal as
    logging does by default)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.held: collections.deque[logging.LogRecord] = collections.deque(maxlen=HELD)
        self.log_file: logging.Handler | None = None
        self.shown = warnings.showwarning  # how warnings were shown before: slkit's own still are

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == LOGGER or record.name.startswith(LOGGER + "."):
            if self.log_file is None and record.levelno >= logging.WARNING:
                logging.lastResort.handle(record)
            return
        if record.levelno >= logging.ERROR:  # a real problem: the user sees it
            logging.lastResort.handle(record)
        if self.log_file is not None:
            self.log_file.handle(record)
        else:
            self.held.append(record)

    def open_log(self, handler: logging.Handler) -> None:
        self.log_file = handler
        while self.held:
            handler.handle(self.held.popleft())


_library_lines: _LibraryLines | None = None


def _from_slkit(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(SLKIT_DIR)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """slkit's own warnings are shown (and logged to the open run log); other packages' are logged only."""
    if _from_slkit(filename):
        if _library_lines is not None and _library_lines.log_file is not None:
            logging.getLogger(LOGGER).warning("%s: %s (%s:%s)", category.__name__, message, Path(filename).name, lineno)
        (_library_lines.shown if _library_lines is not None else warnings.showwarning)(
            message, category, filename, lineno, file, line)
    else:
        logging.getLogger(LIBRARY_WARNINGS).warning("%s: %s (%s:%d)", category.__name__, message, filename, lineno)


def quiet_library_handlers() -> None:
    """Other packages' own handlers to the terminal (transformers puts one on its logger) are taken off; their
    records then reach the root logger, and so the run log."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name == LOGGER or name.startswith(LOGGER + "."):
            continue
        terminal = [h for h in logger.handlers if type(h) is logging.StreamHandler
                    and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]
        for handler in terminal:
            logger.removeHandler(handler)
        if terminal:
            logger.propagate = True


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """While the block runs, other packages' log records and warnings go to the run log opened in it (held until
    then, dropped if none opens) instead of the terminal; see the module's docstring."""
    global _library_lines
    if _library_lines is not None:
        yield
        return
    root = logging.getLogger()
    lines = _LibraryLines()
    root.addHandler(lines)
    _library_lines, warnings.showwarning = lines, _show_warning
    try:
        yield
    except BaseException:
        for record in lines.held:  # what may explain the failure
            logging.lastResort.handle(record)
        raise
    finally:
        _library_lines, warnings.showwarning = None, lines.shown
        root.removeHandler(lines)


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

    routed = _library_lines is not None  # the command line's: it routes warnings already
    if routed:
        quiet_library_handlers()
        _library_lines.open_log(handler)
    else:
        warnings.showwarning = show_and_log  # warnings are still shown where they were (notebook, terminal)
    try:
        yield logger
    finally:
        if routed:
            _library_lines.log_file = None
        else:
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


# What the log says of each stage: "<label>: start" and "<label>: done in <s> s: ..." lines (stage_label's names).
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \w+ \[pid (\d+)\] (.*)$")
_STAGE = re.compile(r"^(baseline evaluation|iteration (\d+) (\w+)|length_control \(after iteration (\d+)\))"
                    r": (start|done in ([\d.]+) s)")


def stage_runs(run_dir: str | Path) -> dict[tuple[int, str], dict[str, Any]]:
    """Per (iteration, stage) the log holds (the final stage as (its iteration, "length_control")): "pids", the
    processes that ran it (a resumed stage ran in several), "starts" (its "start" lines) and "seconds", the
    last attempt's "done in" time (None while it has not finished). {} without a log."""
    path = log_path(run_dir)
    runs: dict[tuple[int, str], dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    for line in lines:
        m = _LINE.match(line)
        s = _STAGE.match(m[2]) if m else None
        if not s:
            continue
        key = (0, "evaluation") if s[1] == "baseline evaluation" else \
            (int(s[2]), s[3]) if s[3] else (int(s[4]), "length_control")
        run = runs.setdefault(key, {"pids": [], "starts": 0, "seconds": None})
        if int(m[1]) not in run["pids"]:
            run["pids"].append(int(m[1]))
        if s[5] == "start":
            run["starts"] += 1
        else:
            run["seconds"] = float(s[6])
    return runs
