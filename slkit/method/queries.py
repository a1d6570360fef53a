"""Step 0, query synthesis (self-instruct): new long-writing queries from a pool of exemplars.

Each slot shows the model `examples_per_prompt` pool instructions of its language, numbered, as the
start of its answer to a chat turn that asks for long-writing instructions (a plain header for a model
without a chat template), and takes the next one; a candidate is kept when it is 3-500 words, not a
near-duplicate of any query seen so far, and the judge answers an exact yes. Up to `max_tries` per slot.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Callable

from slkit.engines.base import Engine, Request, stable_seed
from slkit.method.prompts import (SELF_INSTRUCT_TASK, judge_prompt, parse_judge, parse_self_instruct,
                                  self_instruct_list, self_instruct_prompt)
from slkit.method.textstats import count_words, detect_language
from slkit.core.params import Params, SamplingParams
from slkit.core.records import RecordWriter
from slkit.core.schema import QueryRecord


def shingles(text: str, k: int = 5) -> set[str]:
    """Character k-grams of the normalised text (lowercase, punctuation and spaces removed)."""
    norm = re.sub(r"[\W_]+", "", text.lower())
    return {norm[i:i + k] for i in range(max(1, len(norm) - k + 1))}


class NearDuplicateIndex:
    """Finds texts whose character 5-gram Jaccard similarity with an added text reaches a threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sets: list[set[str]] = []
        self.postings: dict[str, list[int]] = {}

    def is_duplicate(self, text: str) -> bool:
        grams = shingles(text)
        overlap = Counter(i for g in grams for i in self.postings.get(g, ()))
        return any(n / (len(grams) + len(self.sets[i]) - n) >= self.threshold for i, n in overlap.items())

    def add(self, text: str) -> None:
        grams = shingles(text)
        for g in grams:
            self.postings.setdefault(g, []).append(len(self.sets))
        self.sets.append(grams)


def self_instruct_request(engine: Engine, examples: list[str], language: str, max_new_tokens: int,
                          seed: int) -> Request:
    """A chat model gets the reference's form: a user turn asking for long-writing instructions, its answer
    pre-filled with the numbered examples up to the next label; a model without a chat template gets the plain
    header and the list in raw completion mode."""
    if engine.is_chat:
        return Request(engine.render(SELF_INSTRUCT_TASK[language]), None, max_new_tokens, seed,
                       prefill=self_instruct_list(examples, language))
    return Request(self_instruct_prompt(examples, language), None, max_new_tokens, seed)


# An answer longer than this is no exact yes: the cap changes no verdict, it only saves the tokens.
JUDGE_MAX_NEW_TOKENS = 8


def judge_request(engine: Engine, query: str, language: str, seed: int) -> Request:
    """The zero-shot judge as a chat turn; a model without a chat template gets the few-shot prompt."""
    prompt = engine.render(judge_prompt(query, language)) if engine.is_chat else judge_prompt(query, language, True)
    return Request(prompt, None, JUDGE_MAX_NEW_TOKENS, seed)


def judge_sampling(sampling: SamplingParams, is_chat: bool) -> SamplingParams:
    """The judge samples with the run's decoding, as the reference's judge call does (temperature 0.7), with no
    forced length; the few-shot form also stops at its line's end, where the next example would begin."""
    extra = [] if is_chat else ["\n"]
    return sampling.model_copy(update={"stop": list(sampling.stop) + extra, "trim_unfinished": False,
                                       "min_new_tokens": 0})


def _query_id(iteration: int | str, slot: int) -> str:
    """it<k>-q<slot> in macro-iteration k; <name>-q<slot> in a named pass (the final stage's collection)."""
    return f"it{iteration}-q{slot}" if isinstance(iteration, int) else f"{iteration}-q{slot}"


def synthesize_queries(engine: Engine, pool: list[dict], seen: list[str], params: Params, iteration: int | str,
                       writer: RecordWriter, on_done: Callable[[int], None] | None = None) -> Counter:
    """Fill `writer` with params.queries.per_language new queries in each language; returns rejection
    counts by reason.

    `iteration` (a macro-iteration, or the name of another pass) names the query ids and seeds the sampling.

    `pool` holds {"query", "language"} examples to imitate (the exemplars, plus earlier iterations'
    queries when queries.grow_pool: the pool grows between iterations, so that a resumed stage
    replays the same prompts); `seen` every earlier query (for dedup). Records already in `writer`
    (a resumed stage) count as done.
    """
    qp = params.queries
    index = NearDuplicateIndex(qp.dedup_similarity)
    for text in seen + [p["query"] for p in pool] + [r["query"] for r in writer.records]:
        index.add(text)
    by_language = {lang: [p["query"] for p in pool if p["language"] == lang] for lang in qp.languages}
    for lang, examples in by_language.items():
        if len(examples) < qp.examples_per_prompt:
            raise ValueError(f"queries: the exemplar pool has {len(examples)} {lang} queries, "
                             f"fewer than examples_per_prompt={qp.examples_per_prompt}")

    # Slot s asks for one query in language languages[s % L] (the languages advance together); a resumed
    # stage skips the slots already written.
    slots = [qp.languages[s % len(qp.languages)] for s in range(qp.per_language * len(qp.languages))]
    written = {r["id"] for r in writer.records}
    pending = [s for s in range(len(slots)) if _query_id(iteration, s) not in written]
    tries = Counter()
    rejected: Counter = Counter()
    sampling = params.sampling
    judging = judge_sampling(sampling, engine.is_chat)
    while pending:
        # Examples and sampling depend only on (seed, iteration, slot, try): a resumed stage asks the same.
        seeds = [stable_seed(params.seed, iteration, s, tries[s]) for s in pending]
        shown = {s: random.Random(seed).sample(by_language[slots[s]], qp.examples_per_prompt)
                 for s, seed in zip(pending, seeds)}
        requests = [self_instruct_request(engine, shown[s], slots[s], qp.max_new_tokens, seed)
                    for s, seed in zip(pending, seeds)]
        raw = dict(zip(pending, engine.generate(requests, sampling.model_copy(update={"trim_unfinished": False}))))
        candidates = {}
        for s, completion in raw.items():
            tries[s] += 1
            query = parse_self_instruct(completion, slots[s])
            words = count_words(query)
            if not qp.min_words <= words <= qp.max_words:
                rejected["length"] += 1
            elif index.is_duplicate(query):
                rejected["duplicate"] += 1
            else:
                index.add(query)  # later candidates of this batch must not repeat it either
                candidates[s] = query
        answers, verdicts = {}, {}
        if qp.judge and candidates:
            judged = engine.generate(
                [judge_request(engine, q, slots[s], stable_seed(params.seed, iteration, s, tries[s], "judge"))
                 for s, q in candidates.items()], judging)
            answers = dict(zip(candidates, judged))
            verdicts = {s: parse_judge(a, slots[s]) for s, a in answers.items()}
        still_pending = []
        for s in pending:
            if s in candidates and (not qp.judge or verdicts.get(s) is True):
                # The language of a query is what it is written in, whatever its slot asked for.
                # exemplars, completion and judge_answer show how it was made (slkit.lessons.queries).
                writer.write(QueryRecord(id=_query_id(iteration, s), query=candidates[s],
                                         language=detect_language(candidates[s]), words=count_words(candidates[s]),
                                         tries=tries[s], exemplars=shown[s], completion=raw[s],
                                         judge_answer=answers.get(s)))
                if on_done:
                    on_done(1)
                continue
            if s in candidates:
                rejected["judge_no" if verdicts.get(s) is False else "judge_unclear"] += 1
            if tries[s] < qp.max_tries:
                still_pending.append(s)
            else:
                rejected["gave_up"] += 1
                if on_done:
                    on_done(1)
        pending = still_pending
    return rejected
