"""Step 1, drafts: the Generator answers each query `samples_per_query` times; each sample gets up to
`max_tries` tries to pass the quality check.

Each (query, sample) is a job (slkit.engines.jobs) that retries at its own pace; its record is written when
it passes. A draft that already repeats an n-gram stops generating there (its request's stop_early check):
it would fail the check whatever it wrote next.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

from slkit.core.params import Params, QualityParams
from slkit.core.records import RecordWriter
from slkit.core.schema import DraftRecord
from slkit.engines.base import Engine, Request, stable_seed
from slkit.engines.jobs import Job, JobsRun, run_jobs
from slkit.method.quality import quality_failure, repetition_watch
from slkit.method.textstats import count_words


def draft_id(query_id: str, sample: int) -> str:
    return f"{query_id}-d{sample}"


def write_drafts(engine: Engine, queries: list[dict], params: Params, iteration: int | str, writer: RecordWriter,
                 rules: QualityParams, on_done: Callable[[int], None] | None = None) -> Counter:
    """Append one record per accepted draft to `writer`; returns rejection counts by reason, and `dropped`: the
    drafts still being retried when drafts.finish_share of them had ended."""
    dp = params.drafts
    max_new = dp.max_new_tokens or params.sampling.max_new_tokens
    written = {r["id"] for r in writer.records}
    rejected: Counter = Counter()

    def draft_job(query: dict, sample: int, prompt: str) -> Job:
        for try_index in range(dp.max_tries):
            seed = stable_seed(params.seed, iteration, query["id"], sample, try_index)
            text = yield (Request(prompt, "generator", max_new, seed,
                                  stop_early=repetition_watch(query["language"], rules, params.sampling)),
                          params.sampling)
            failure = quality_failure(text, query["language"], rules, getattr(text, "stopped_early", False))
            if failure is None:
                writer.write(DraftRecord(id=draft_id(query["id"], sample), query_id=query["id"], query=query["query"],
                                         language=query["language"], sample=sample, draft=text,
                                         words=count_words(text), tries=try_index + 1))
                break
            rejected[failure] += 1
        else:
            rejected["gave_up"] += 1
        if on_done:
            on_done(1)

    prompts = {q["id"]: engine.render(q["query"]) for q in queries}
    slots = [(q, k) for q in queries for k in range(dp.samples_per_query)]
    jobs = [draft_job(q, k, prompts[q["id"]]) for q, k in slots if draft_id(q["id"], k) not in written]
    run: JobsRun = run_jobs(engine, jobs, dp.finish_share, ended_before=len(slots) - len(jobs))
    if run.dropped:
        rejected["dropped"] += run.dropped
    return rejected
