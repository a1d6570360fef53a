"""Step 2, extension (docs/method.md, "Extension").

Each draft gets `samples_per_draft` independent jobs. A job runs up to `micro_iterations` micro-iterations:
phase 1 shows the Extender the extension template (prompts.EXTENSION) with the query and the former
half of the current text, and keeps the first n*2//3 of the n paragraphs it returns; phase 2 shows it
the same template with the query and the whole current text, pre-fills its answer with the kept part
and lets it continue. A micro-iteration is accepted when the new text passes the quality check and is longer
than the best so far. The job's result is kept only if words(best) > 1.2 x words(draft); otherwise
the job tries again from the draft, up to `max_tries` tries. Each job goes at its own pace (slkit.engines.jobs): on
a server its next request leaves as soon as its last one returned; on a batching engine all jobs advance
together, one batch per phase of a micro-iteration. A phase-2 continuation that already repeats an n-gram stops
there (its request's stop_early check): the micro-iteration would be rejected whatever it wrote next.

A kept job's record lists every micro-iteration it ran, of every try (`micro_iterations`, see
`micro_iteration_trace`), so a reader can follow one draft through the stage; the texts that follow from these
(the micro-iteration's input, the phase-1 prompt, the kept head, the pre-fill) are rebuilt by
slkit.lessons.extensions.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

from slkit.core.params import Params, QualityParams
from slkit.core.records import RecordWriter
from slkit.core.schema import ExtensionRecord
from slkit.engines.base import Engine, Request, stable_seed
from slkit.engines.jobs import Job, run_jobs
from slkit.method.prompts import extension_prompt
from slkit.method.quality import quality_failure, repetition_watch
from slkit.method.textstats import count_words


def former_part(text: str) -> str:
    """The first half, rounded down, of the text's parts, as the reference cuts it: the parts are the pieces
    between blank lines ("\n\n"), or the lines when there are at most 2 such pieces; they are joined again with
    a blank line. A text of one line has no former part (its phase-1 prompt shows an empty text)."""
    parts = text.split("\n\n")
    if len(parts) <= 2:
        parts = text.split("\n")
    return "\n\n".join(parts[:len(parts) // 2])


def kept_paragraphs(text: str, fraction: float) -> int:
    """How many paragraphs keep_head keeps of a phase-1 output of n pieces between blank lines: floor(n x
    fraction), which is none of one paragraph."""
    n = len(text.split("\n\n"))
    # The epsilon keeps a product such as 0.29 x 100 = 28.999999999999996 at 29.
    return math.floor(n * fraction + 1e-9)


def first_paragraphs(text: str, paragraphs: int) -> str:
    """The text up to the end of its first `paragraphs` pieces between blank lines, verbatim."""
    return "\n\n".join(text.split("\n\n")[:paragraphs])


def keep_head(text: str, fraction: float) -> str:
    """The first floor(n x fraction) of the n paragraphs of a phase-1 output, verbatim (its tail tends to
    drift). With 2/3: 1, 2, 4, 5, 8 paragraphs keep 0, 1, 2, 3, 5, as the reference's n*2//3."""
    return first_paragraphs(text, kept_paragraphs(text, fraction))


def phase2_prefill(kept: str) -> str:
    """The start of phase 2's answer: the kept head itself, with nothing added, as in the reference."""
    return kept


def phase2_text(kept: str, continuation: str) -> str:
    """The micro-iteration's new text: the kept head, then the continuation. The reference joins the two raw; slkit's
    engines strip a continuation's leading line breaks, so a blank line puts them back (the break the model
    writes after a kept head that ends a paragraph)."""
    return "\n\n".join(p for p in (kept, continuation) if p)


def micro_iteration_trace(try_index: int, micro_iteration: int, phase1: str, kept: int, continuation: str,
                          words: int, verdict: str) -> dict:
    """What one micro-iteration leaves in its job's record: the try and the micro-iteration (from 1), the
    Extender's phase-1 output, how many of its paragraphs were kept (the kept head is first_paragraphs(phase1,
    kept)), its continuation after the pre-fill, the words of kept head + continuation, and the verdict
    ('accepted', a quality failure, or 'not_longer'). The micro-iteration's input text, the prompts
    and the pre-fill follow from these and the record's draft (slkit.lessons.extensions)."""
    return {"try_index": try_index, "micro_iteration": micro_iteration, "phase1": phase1, "kept_paragraphs": kept,
            "continuation": continuation, "words": words, "verdict": verdict}


def job_id(draft_id: str, sample: int) -> str:
    """The id of a draft's `sample`-th extension job, and of the record it writes."""
    return f"{draft_id}-x{sample}"


def extend_drafts(engine: Engine, drafts: list[dict], params: Params, iteration: int, writer: RecordWriter,
                  rules: QualityParams, on_done: Callable[[int], None] | None = None) -> Counter:
    """Append one record per job whose extension met the length rule; returns outcome counts (`dropped`: jobs
    still running when extensions.finish_share of them had ended). Jobs whose record is already in `writer` (a
    resumed stage) are not run again."""
    ep = params.extensions
    max1 = ep.phase1_max_new_tokens or params.sampling.max_new_tokens
    max2 = ep.phase2_max_new_tokens or params.sampling.max_new_tokens
    counts: Counter = Counter()

    def extension_job(d: dict, sample: int) -> Job:
        """Micro-iterations of phase 1 and phase 2 on the best text so far, tried again from the draft until the
        length rule holds or max_tries is spent; the record is written when the job is kept."""
        id_, trace = job_id(d["id"], sample), []
        for try_index in range(1, ep.max_tries + 1):
            current, best_words, accepted = d["draft"], d["words"], 0
            for micro_iteration in range(ep.micro_iterations):
                seed = stable_seed(params.seed, iteration, id_, try_index, micro_iteration)
                phase1 = yield (Request(engine.render(extension_prompt(d["query"], former_part(current), d["language"])),
                                        "extender", max1, seed), params.sampling)
                kept = keep_head(phase1, ep.keep_fraction)
                prefill = phase2_prefill(kept)
                continuation = yield (Request(
                    engine.render(extension_prompt(d["query"], current, d["language"])), "extender", max2, seed + 1,
                    prefill=prefill, stop_early=repetition_watch(d["language"], rules, params.sampling, kept, prefill)),
                    params.sampling)
                new_text = phase2_text(kept, continuation)
                words = count_words(new_text)
                failure = quality_failure(new_text, d["language"], rules,
                                          getattr(continuation, "stopped_early", False))
                if failure is None and words > best_words:
                    current, best_words, accepted, verdict = new_text, words, accepted + 1, "accepted"
                    counts["micro_iteration_accepted"] += 1
                else:
                    verdict = failure or "not_longer"
                    counts[f"micro_iteration_rejected_{verdict}"] += 1
                trace.append(micro_iteration_trace(try_index, micro_iteration + 1, phase1,
                                                   kept_paragraphs(phase1, ep.keep_fraction), continuation, words,
                                                   verdict))
            if best_words > ep.min_ratio * d["words"]:
                writer.write(ExtensionRecord(
                    id=id_, draft_id=d["id"], sample=sample, query_id=d["query_id"], query=d["query"],
                    language=d["language"], draft=d["draft"], draft_words=d["words"], extended=current,
                    words=best_words, ratio=round(best_words / max(1, d["words"]), 3), tries=try_index,
                    micro_iterations_accepted=accepted, micro_iterations=trace))
                counts["accepted"] += 1
                break
            if try_index < ep.max_tries:
                counts["retried"] += 1
        else:
            counts["gave_up"] += 1
        if on_done:
            on_done(1)

    written = {r["id"] for r in writer.records}
    everyone = [(d, k) for d in drafts for k in range(ep.samples_per_draft)]
    jobs = [extension_job(d, k) for d, k in everyone if job_id(d["id"], k) not in written]
    run = run_jobs(engine, jobs, ep.finish_share, ended_before=len(everyone) - len(jobs))
    if run.dropped:
        counts["dropped"] += run.dropped
    return counts
