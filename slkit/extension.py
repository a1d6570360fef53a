"""Stage 2, two-stage extension (METHOD.md step 2).

For each draft, up to `micro_iterations` rounds: stage 1 asks the Extender to enrich the former
half of the current text and keeps the first 2/3 of its paragraphs; stage 2 shows the Extender the
query and the whole current text, pre-fills its answer with the kept part and lets it continue.
A round is accepted when the new text passes the quality check and is longer than the best so far.
The extension is kept only if words(best) > 1.2 x words(draft); otherwise the whole extension is
retried, up to `max_tries` times. All drafts advance together, so every engine call is one batch.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from slkit.engines import Engine, Request, stable_seed
from slkit.params import Params, QualityParams
from slkit.prompts import extend_part_prompt, extend_whole_prompt
from slkit.quality import quality_failure
from slkit.records import RecordWriter
from slkit.textstats import count_words, join_paragraphs, split_paragraphs


def former_part(text: str) -> str:
    """The first half of the text's paragraphs (at least one)."""
    paragraphs = split_paragraphs(text)
    return join_paragraphs(paragraphs[: max(1, len(paragraphs) // 2)])


def keep_head(text: str, fraction: float) -> str:
    """The first `fraction` of the paragraphs of a stage-1 output (its tail tends to drift)."""
    paragraphs = split_paragraphs(text)
    return join_paragraphs(paragraphs[: math.ceil(len(paragraphs) * fraction)] if paragraphs else [])


@dataclass
class _Job:
    draft: dict
    attempt: int = 1
    round: int = 0
    current: str = ""
    best_words: int = 0
    rounds_accepted: int = 0

    def restart(self) -> None:
        self.current, self.best_words, self.round, self.rounds_accepted = self.draft["draft"], self.draft["words"], 0, 0


def extend_drafts(engine: Engine, drafts: list[dict], params: Params, iteration: int, writer: RecordWriter,
                  rules: QualityParams, on_done: Callable[[int], None] | None = None) -> Counter:
    """Append one record per draft whose extension met the length rule; returns outcome counts."""
    ep = params.extension
    max1 = ep.stage1_max_new_tokens or params.sampling.max_new_tokens
    max2 = ep.stage2_max_new_tokens or params.sampling.max_new_tokens
    written = {r["draft_id"] for r in writer.records}
    jobs = [_Job(d) for d in drafts if d["id"] not in written]
    for job in jobs:
        job.restart()
    counts: Counter = Counter()
    while jobs:
        seeds = [stable_seed(params.seed, iteration, j.draft["id"], j.attempt, j.round) for j in jobs]
        stage1 = engine.generate(
            [Request(engine.render(extend_part_prompt(former_part(j.current), j.draft["language"])), "extender", max1, s)
             for j, s in zip(jobs, seeds)], params.sampling)
        kept = [keep_head(t, ep.keep_fraction) for t in stage1]
        stage2 = engine.generate(
            [Request(engine.render(extend_whole_prompt(j.draft["query"], j.current, j.draft["language"])), "extender",
                     max2, s + 1, prefill=k + "\n\n" if k else "") for j, k, s in zip(jobs, kept, seeds)],
            params.sampling)
        remaining = []
        for job, k, continuation in zip(jobs, kept, stage2):
            new_text = join_paragraphs([p for p in (k, continuation) if p])
            words = count_words(new_text)
            failure = quality_failure(new_text, job.draft["language"], rules)
            if failure is None and words > job.best_words:
                job.current, job.best_words = new_text, words
                job.rounds_accepted += 1
                counts["round_accepted"] += 1
            else:
                counts[f"round_rejected_{failure or 'not_longer'}"] += 1
            job.round += 1
            if job.round < ep.micro_iterations:
                remaining.append(job)
                continue
            if job.best_words > ep.min_ratio * job.draft["words"]:
                d = job.draft
                writer.write({"id": f"{d['id']}-x", "draft_id": d["id"], "query_id": d["query_id"],
                              "query": d["query"], "language": d["language"], "draft": d["draft"],
                              "draft_words": d["words"], "extended": job.current, "words": job.best_words,
                              "ratio": round(job.best_words / max(1, d["words"]), 3),
                              "attempts": job.attempt, "rounds_accepted": job.rounds_accepted})
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
