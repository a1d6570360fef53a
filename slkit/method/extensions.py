"""Stage 2, two-stage extension (docs/method.md, "Extension").

Each draft gets `samples_per_draft` independent jobs. A job runs up to `micro_iterations` rounds:
stage 1 shows the Extender the extension template (prompts.EXTENSION) with the query and the former
half of the current text, and keeps the first n*2//3 of the n paragraphs it returns; stage 2 shows it
the same template with the query and the whole current text, pre-fills its answer with the kept part
and lets it continue. A round is accepted when the new text passes the quality check and is longer
than the best so far. The job's result is kept only if words(best) > 1.2 x words(draft); otherwise
the whole job is retried, up to `max_tries` times. All jobs advance together, so every engine call
is one batch.

A kept job's record lists every round it ran, of every attempt (`rounds`, see `round_trace`), so a
reader can follow one draft through the stage; the texts that follow from these (the round's input,
the stage-1 prompt, the kept head, the pre-fill) are rebuilt by slkit.lessons.extensions.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from slkit.engines.base import Engine, Request, stable_seed
from slkit.method.prompts import extension_prompt
from slkit.method.quality import quality_failure
from slkit.method.textstats import count_words
from slkit.running.params import Params, QualityParams
from slkit.running.records import RecordWriter
from slkit.running.schema import ExtensionRecord


def former_part(text: str) -> str:
    """The first half, rounded down, of the text's parts, as the reference cuts it: the parts are the pieces
    between blank lines ("\n\n"), or the lines when there are at most 2 such pieces; they are joined again with
    a blank line. A text of one line has no former part (its stage-1 prompt shows an empty text)."""
    parts = text.split("\n\n")
    if len(parts) <= 2:
        parts = text.split("\n")
    return "\n\n".join(parts[:len(parts) // 2])


def kept_paragraphs(text: str, fraction: float) -> int:
    """How many paragraphs keep_head keeps of a stage-1 output of n pieces between blank lines: floor(n x
    fraction), which is none of one paragraph."""
    n = len(text.split("\n\n"))
    # The epsilon keeps a product such as 0.29 x 100 = 28.999999999999996 at 29.
    return math.floor(n * fraction + 1e-9)


def first_paragraphs(text: str, paragraphs: int) -> str:
    """The text up to the end of its first `paragraphs` pieces between blank lines, verbatim."""
    return "\n\n".join(text.split("\n\n")[:paragraphs])


def keep_head(text: str, fraction: float) -> str:
    """The first floor(n x fraction) of the n paragraphs of a stage-1 output, verbatim (its tail tends to
    drift). With 2/3: 1, 2, 4, 5, 8 paragraphs keep 0, 1, 2, 3, 5, as the reference's n*2//3."""
    return first_paragraphs(text, kept_paragraphs(text, fraction))


def stage2_prefill(kept: str) -> str:
    """The start of stage 2's answer: the kept head itself, with nothing added, as in the reference."""
    return kept


def stage2_text(kept: str, continuation: str) -> str:
    """The round's new text: the kept head, then the continuation. The reference joins the two raw; slkit's
    engines strip a continuation's leading line breaks, so a blank line puts them back (the break the model
    writes after a kept head that ends a paragraph)."""
    return "\n\n".join(p for p in (kept, continuation) if p)


def round_trace(attempt: int, round_: int, stage1: str, kept: int, continuation: str, words: int,
                verdict: str) -> dict:
    """What one round leaves in its job's record: the attempt and round (from 1), the Extender's stage-1
    output, how many of its paragraphs were kept (the kept head is first_paragraphs(stage1, kept)), its
    continuation after the pre-fill, the words of kept head + continuation, and the verdict ('accepted', a
    quality failure, or 'not_longer'). The round's input text, the prompts
    and the pre-fill follow from these and the record's draft (slkit.lessons.extensions)."""
    return {"attempt": attempt, "round": round_, "stage1": stage1, "kept_paragraphs": kept,
            "continuation": continuation, "words": words, "verdict": verdict}


def job_id(draft_id: str, sample: int) -> str:
    """The id of a draft's `sample`-th extension job, and of the record it writes."""
    return f"{draft_id}-x{sample}"


@dataclass
class _Job:
    draft: dict
    sample: int
    attempt: int = 1
    round: int = 0
    current: str = ""
    best_words: int = 0
    rounds_accepted: int = 0
    rounds: list[dict] = field(default_factory=list)  # round_trace of every round of every attempt

    @property
    def id(self) -> str:
        return job_id(self.draft["id"], self.sample)

    def restart(self) -> None:
        self.current, self.best_words, self.round, self.rounds_accepted = self.draft["draft"], self.draft["words"], 0, 0


def extend_drafts(engine: Engine, drafts: list[dict], params: Params, iteration: int, writer: RecordWriter,
                  rules: QualityParams, on_done: Callable[[int], None] | None = None) -> Counter:
    """Append one record per job whose extension met the length rule; returns outcome counts.
    Jobs whose record is already in `writer` (a resumed stage) are not run again."""
    ep = params.extensions
    max1 = ep.stage1_max_new_tokens or params.sampling.max_new_tokens
    max2 = ep.stage2_max_new_tokens or params.sampling.max_new_tokens
    written = {r["id"] for r in writer.records}
    jobs = [_Job(d, k) for d in drafts for k in range(ep.samples_per_draft) if job_id(d["id"], k) not in written]
    for job in jobs:
        job.restart()
    counts: Counter = Counter()
    while jobs:
        seeds = [stable_seed(params.seed, iteration, j.id, j.attempt, j.round) for j in jobs]
        stage1 = engine.generate(
            [Request(engine.render(extension_prompt(j.draft["query"], former_part(j.current), j.draft["language"])),
                     "extender", max1, s) for j, s in zip(jobs, seeds)], params.sampling)
        kept = [keep_head(t, ep.keep_fraction) for t in stage1]
        stage2 = engine.generate(
            [Request(engine.render(extension_prompt(j.draft["query"], j.current, j.draft["language"])), "extender",
                     max2, s + 1, prefill=stage2_prefill(k)) for j, k, s in zip(jobs, kept, seeds)],
            params.sampling)
        remaining = []
        for job, s1, k, continuation in zip(jobs, stage1, kept, stage2):
            new_text = stage2_text(k, continuation)
            words = count_words(new_text)
            failure = quality_failure(new_text, job.draft["language"], rules)
            if failure is None and words > job.best_words:
                job.current, job.best_words = new_text, words
                job.rounds_accepted += 1
                verdict = "accepted"
                counts["round_accepted"] += 1
            else:
                verdict = failure or "not_longer"
                counts[f"round_rejected_{verdict}"] += 1
            job.rounds.append(round_trace(job.attempt, job.round + 1, s1, kept_paragraphs(s1, ep.keep_fraction),
                                          continuation, words, verdict))
            job.round += 1
            if job.round < ep.micro_iterations:
                remaining.append(job)
                continue
            if job.best_words > ep.min_ratio * job.draft["words"]:
                d = job.draft
                writer.write(ExtensionRecord(
                    id=job.id, draft_id=d["id"], sample=job.sample, query_id=d["query_id"], query=d["query"],
                    language=d["language"], draft=d["draft"], draft_words=d["words"], extended=job.current,
                    words=job.best_words, ratio=round(job.best_words / max(1, d["words"]), 3),
                    attempts=job.attempt, rounds_accepted=job.rounds_accepted, rounds=job.rounds))
                counts["accepted"] += 1
            elif job.attempt < ep.max_tries:
                counts["retried"] += 1
                job.attempt += 1
                job.restart()
                remaining.append(job)
                continue
            else:
                counts["gave_up"] += 1
            if on_done:
                on_done(1)
        jobs = remaining
    return counts
