"""What every stage shares: skip a finished stage, hold its lock, turn out-of-memory into advice, write
records incrementally with an engine whose texts count in the stage's progress and cap tally (WatchedEngine),
and the stage's one engine (StageEngine).

A stage is a function (run_dir, iteration, params=None) -> summary in slkit.stages.<name>, one module per stage
of slkit.core.registry.STAGES. It reads and writes runs/<run>/iter_<k>/ (the final stage
runs/<run>/length_control/), records its summary in <name>.done.json last, and returns that summary. The
notebooks call these and show the results; `slkit run` skips a stage whose done-marker exists. A killed
stage resumes from its `.partial` records. Params are read once: the notebook passes the ones it read from
runs/<run>/params.yaml, a stage called without them reads them, and everything below takes them as arguments.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

from slkit.core.layout import (
    current_adapters,
    iter_dir,
    load_run_params,
    lock_path,
    stage_done,
    stage_summary,
)
from slkit.core.logs import counts, run_log, stage_label
from slkit.core.params import Params, SamplingParams
from slkit.core.records import Progress, RecordWriter, read_records
from slkit.core.runlock import boot_id, lock_for_stage
from slkit.core.schema import QueryRecord, record_type
from slkit.engines import load_engine
from slkit.engines.base import CapTally, Request
from slkit.method.exemplars import load_exemplars

OOM_ADVICE = {
    "training": ("lower training.max_length (now {t.max_length}) or training.batch_size (now {t.batch_size}), or set "
              "training.activation_offload: true, training.mlp_tile_tokens: 4096, training.liger_kernels: true"),
    "generation": ("lower engine.batch_size (now {e.batch_size}) or the stage's max_new_tokens "
                   "(sampling.max_new_tokens is {s.max_new_tokens}), or set model.load_in_4bit: true"),
}


def raised_in_training(err: BaseException) -> bool:
    """Whether `err` came out of adapter training (slkit.training) rather than generation: the final stage does
    both in one process, so its name alone cannot say which params to lower."""
    return any(frame.f_globals.get("__name__", "").startswith("slkit.training")
               for frame, _ in traceback.walk_tb(err.__traceback__))


StageFunction = Callable[[str | Path, int, Params], dict[str, Any]]


def skip_when_done(stage: str) -> Callable[[StageFunction], Callable[..., dict[str, Any]]]:
    """A finished stage returns its recorded summary instead of running again. A stage to run gets the run's
    params (`params`, or runs/<run>/params.yaml read once here) and its directory, made; while it runs it leaves
    its PID in <stage>.lock; out of GPU memory, it stops with the params to lower."""
    def wrap(fn: StageFunction) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def run(run_dir: str | Path, iteration: int, params: Params | None = None) -> dict[str, Any]:
            if stage_done(run_dir, iteration, stage):
                return stage_summary(run_dir, iteration, stage)
            params = params if params is not None else load_run_params(run_dir)
            run_lock = lock_for_stage(run_dir, stage)  # refused while another run holds run_dir
            lock = lock_path(run_dir, iteration, stage)
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(f"{os.getpid()} {boot_id()}")  # the PID means something on this boot only
            # The stage runs in a notebook kernel: it logs to the run's slkit.log itself.
            with run_log(run_dir) as log:
                where, start = stage_label(iteration, stage), time.monotonic()
                if run_lock and run_lock.took_over:
                    log.warning("took over the run lock of %s, which is no longer running", run_lock.took_over)
                log.info("%s: start", where)
                try:
                    summary = fn(run_dir, iteration, params)
                except Exception as err:
                    failure = err
                    # by name: torch's, or one a child process of the stage reported (stages.length_control)
                    if "OutOfMemoryError" in (type(err).__name__, getattr(err, "child_error", None)):
                        advice = OOM_ADVICE["training" if stage == "training" or raised_in_training(err) else "generation"].format(
                            t=params.training, e=params.engine, s=params.sampling)
                        failure = MemoryError(f"out of GPU memory in stage {stage} of iteration {iteration}: {advice}. "
                                              f"Finished work is kept: rerun slkit run with --set KEY=VALUE to resume.")
                    log.error("%s: failed after %.1f s: %s: %s", where, time.monotonic() - start,
                              type(failure).__name__, failure, exc_info=err)
                    if failure is err:
                        raise
                    raise failure from err
                finally:
                    lock.unlink(missing_ok=True)
                    if run_lock:
                        run_lock.release()
                log.info("%s: done in %.1f s: %s", where, time.monotonic() - start, counts(summary))
                return summary
        return run
    return wrap


class WatchedEngine:
    """An engine whose every text counts, as the engine finishes it, in the stage's Progress, and in a CapTally
    when it was cut by max_new_tokens; the method's code calls it as any engine."""

    def __init__(self, engine: Any, progress: Progress, caps: CapTally | None = None):
        self.engine, self.progress, self.caps = engine, progress, caps
        self._counting = threading.Lock()
        if hasattr(engine, "submit"):  # slkit.engines.jobs runs jobs at their own pace on such an engine
            self.submit = self._submit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, requests: list[Request], sampling: SamplingParams,
                 on_done: Callable[[int], None] | None = None) -> list[str]:
        def finished(n: int) -> None:
            self.progress.generated(n)
            if on_done:
                on_done(n)

        texts = self.engine.generate(requests, sampling, finished)
        if self.caps is not None:
            self.caps.add(requests, texts)
        return texts

    def _submit(self, request: Request, sampling: SamplingParams) -> Future:
        def count(future: Future) -> None:
            if future.cancelled() or future.exception() is not None:
                return
            with self._counting:  # done callbacks run on the engine's worker threads
                self.progress.generated(1)
                if self.caps is not None:
                    self.caps.add([request], [future.result()])

        future = self.engine.submit(request, sampling)
        future.add_done_callback(count)
        return future


def generate_records(params: Params, run_dir: str | Path, iteration: int, stage: str, path: Path, total: int,
                     work: Callable[..., Counter], shared: StageEngine | None = None, caps: CapTally | None = None,
                     texts_per_item: int = 1) -> tuple[list[dict], Counter]:
    """Run `work(engine, writer, on_done)` with this iteration's adapters, writing the records file `path`
    incrementally. A finished `path` is read, not rewritten. With `shared`, its engine is used and left open for
    the rest of the stage. The engine's texts count in `caps` and in the progress, in `path`'s directory
    (`texts_per_item` texts expected per record of `total`)."""
    if path.exists():
        return read_records(path, record_type(path)), Counter()
    with RecordWriter(path) as writer:
        progress = Progress(path.parent, stage, total, len(writer.records), texts_per_item)
        with stage_engine(shared, params, current_adapters(run_dir, iteration)) as engine:
            counts = work(WatchedEngine(engine, progress, caps), writer, progress.advance)
        return writer.finish(), counts


def earlier_queries(run_dir: str | Path, iteration: int) -> list[dict]:
    return [r for k in range(1, iteration) for r in read_records(iter_dir(run_dir, k) / "queries.jsonl", QueryRecord)]


def exemplar_pool(params: Params, earlier: list[dict]) -> list[dict]:
    """The examples self-instruct imitates: the exemplars, plus earlier queries when queries.grow_pool."""
    pool = load_exemplars(params.queries.exemplar_files)
    if params.queries.grow_pool:  # earlier iterations' queries are examples too
        pool += [{"query": r["query"], "language": r["language"]} for r in earlier]
    return pool


class StageEngine:
    """A stage's engine, started at its first use and closed once by the stage. vLLM keeps the GPU memory
    it reserved until its process ends, so a second engine started in the same stage process does not fit
    (measured on an H200: 20 of 140 GiB free after the first closed): the parts of a stage that run on the
    same model and backend share this one (the base model is role None beside the LoRA roles). The
    length-control stage, which trains between its engines, runs each on vLLM in a child process."""

    def __init__(self, params: Params, adapters: dict[str, str | None]):
        self.params, self.adapters, self.engine = params, adapters, None

    def get(self):
        if self.engine is None:
            self.engine = load_engine(self.params, self.adapters)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __enter__(self) -> StageEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def stage_engine(shared: StageEngine | None, params: Params, adapters: dict[str, str | None]) -> Iterator[Any]:
    """`shared`'s engine, left open for the rest of the stage; without one, an engine of `params` with
    `adapters`, closed when the block ends (also when it raises)."""
    if shared is not None:
        yield shared.get()
        return
    with StageEngine(params, adapters) as own:
        yield own.get()
