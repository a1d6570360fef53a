"""Jobs that each go at their own pace: a draft with its tries, an extension job with its micro-iterations and
tries, a judged answer with its tries.

    def draft_job(query):             # a job is a generator:
        text = yield request, sampling  # it yields the call it needs and receives the engine's text,
        ...                             # writes its record itself, and returns when it has ended
    ended = run_jobs(engine, [draft_job(q) for q in queries], finish_share=0.95)

`run_jobs` drives many jobs on one engine. An engine that can take one request at a time (`submit`, the
endpoint engine behind a vLLM server) gets each job's next call as soon as the job's previous call
returned, so no job waits for the slowest text of a batch and the server always has work. An engine that
only generates batches (transformers on a CPU, in-process vLLM) advances every job one call per step, all
calls of a step in one batch (lockstep), as slkit always did. Every call carries its own seed, so a job
receives the same texts either way and writes the same record: only the order of the records differs.

The tail: a stage may end once `finish_share` of its jobs have ended (the reference ends its drafts and
extensions at 95%): the few jobs still running then are dropped, not left to hold the GPU alone.
"""
from __future__ import annotations

import math
from collections.abc import Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

from slkit.core.params import SamplingParams
from slkit.engines.base import Request

Call = tuple[Request, SamplingParams]
Job = Generator[Call, str, Any]


@dataclass
class JobsRun:
    """What run_jobs did: jobs that ended by themselves, and jobs dropped when finish_share was reached."""
    ended: int = 0
    dropped: int = 0


def jobs_target(total: int, finish_share: float) -> int:
    """How many of `total` jobs must end before the rest may be dropped (all of them with finish_share 1)."""
    return total if finish_share >= 1 else min(total, math.ceil(total * finish_share - 1e-9))


def run_jobs(engine: Any, jobs: Iterable[Job], finish_share: float = 1.0, ended_before: int = 0) -> JobsRun:
    """Run every job to its end, or until `finish_share` of all jobs (these plus `ended_before`, those a
    resumed stage finished earlier) have ended; the rest are closed unfinished. A submitting engine runs at
    most its `max_in_flight` jobs at once (else all), so that a killed stage loses only the jobs that ran."""
    jobs = list(jobs)
    target = jobs_target(len(jobs) + ended_before, finish_share)
    run = JobsRun(ended=ended_before)
    if hasattr(engine, "submit"):
        _run_submitting(engine, jobs, run, target, getattr(engine, "max_in_flight", None) or len(jobs))
    else:
        _run_lockstep(engine, jobs, run, target)
    run.ended -= ended_before
    return run


def _start(job: Job, run: JobsRun) -> Call | None:
    """The job's first call, or None when it ended without one."""
    try:
        return next(job)
    except StopIteration:
        run.ended += 1
        return None


def _advance(job: Job, text: str, run: JobsRun) -> Call | None:
    """Hand `text` to the job: its next call, or None when it has ended."""
    try:
        return job.send(text)
    except StopIteration:
        run.ended += 1
        return None


def _drop(jobs: Iterable[Job], run: JobsRun) -> None:
    for job in jobs:
        job.close()
        run.dropped += 1


def _run_lockstep(engine: Any, jobs: list[Job], run: JobsRun, target: int) -> None:
    """One call of every running job per step, the calls of one sampling in one generate (in job order)."""
    running = [(job, call) for job in jobs if (call := _start(job, run)) is not None]
    while running:
        if run.ended >= target:
            _drop((job for job, _ in running), run)
            return
        groups: dict[str, list[int]] = {}
        for i, (_, (_, sampling)) in enumerate(running):
            groups.setdefault(sampling.model_dump_json(), []).append(i)
        texts: list[str] = [""] * len(running)
        for members in groups.values():
            sampling = running[members[0]][1][1]
            for i, text in zip(members, engine.generate([running[i][1][0] for i in members], sampling)):
                texts[i] = text
        running = [(job, call) for (job, _), text in zip(running, texts)
                   if (call := _advance(job, text, run)) is not None]


def _run_submitting(engine: Any, jobs: list[Job], run: JobsRun, target: int, in_flight: int) -> None:
    """Each job's next call is submitted when its previous one returns; at most `in_flight` jobs run at once."""
    waiting = iter(jobs)
    futures: dict[Future, Job] = {}

    def start_next() -> bool:
        for job in waiting:
            call = _start(job, run)
            if call is not None:
                futures[engine.submit(*call)] = job
                return True
        return False

    failed = True
    try:
        while len(futures) < in_flight and start_next():
            pass
        while futures and run.ended < target:
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                if run.ended >= target:
                    break  # the rest, finished or not, are dropped below
                job = futures.pop(future)
                call = _advance(job, future.result(), run)
                if call is not None:
                    futures[engine.submit(*call)] = job
                elif run.ended < target:
                    start_next()
        failed = False
    finally:
        # The target reached, or a failure (a server gone, Ctrl-C): what still runs is abandoned.
        for future in futures:
            future.cancel()
        if futures and hasattr(engine, "abandon"):
            engine.abandon(list(futures))
        if failed:
            for job in [*futures.values(), *waiting]:
                job.close()
        else:
            _drop([*futures.values(), *waiting], run)
