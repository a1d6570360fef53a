"""Stage 1, drafts: the Generator answers each query `samples_per_query` times; each sample is
retried up to `max_tries` times until it passes the quality check."""
from __future__ import annotations

from collections import Counter
from typing import Callable

from slkit.engines.base import Engine, Request, stable_seed
from slkit.method.quality import quality_failure
from slkit.method.textstats import count_words
from slkit.running.params import Params, QualityParams
from slkit.running.records import RecordWriter
from slkit.running.schema import DraftRecord


def write_drafts(engine: Engine, queries: list[dict], params: Params, iteration: int | str, writer: RecordWriter,
                 rules: QualityParams, on_done: Callable[[int], None] | None = None) -> Counter:
    """Append one record per accepted draft to `writer`; returns rejection counts by reason."""
    dp = params.drafts
    max_new = dp.max_new_tokens or params.sampling.max_new_tokens
    written = {r["id"] for r in writer.records}
    slots = [(q, k) for q in queries for k in range(dp.samples_per_query) if f"{q['id']}-d{k}" not in written]
    prompts = {q["id"]: engine.render(q["query"]) for q in queries}
    tries: Counter = Counter()
    rejected: Counter = Counter()
    while slots:
        requests = [Request(prompts[q["id"]], "generator", max_new, stable_seed(params.seed, iteration, q["id"], k, tries[q["id"], k]))
                    for q, k in slots]
        texts = engine.generate(requests, params.sampling)
        retry = []
        for (q, k), text in zip(slots, texts):
            tries[q["id"], k] += 1
            failure = quality_failure(text, q["language"], rules)
            if failure is None:
                writer.write(DraftRecord(id=f"{q['id']}-d{k}", query_id=q["id"], query=q["query"],
                                         language=q["language"], sample=k, draft=text, words=count_words(text),
                                         tries=tries[q["id"], k]))
            else:
                rejected[failure] += 1
                if tries[q["id"], k] < dp.max_tries:
                    retry.append((q, k))
                    continue
                rejected["gave_up"] += 1
            if on_done:
                on_done(1)
        slots = retry
    return rejected
