"""The quality judge: an LLM scores each response 1-10 on seven dimensions, as JSON, ignoring length.

Any slkit engine runs it (evaluation.judge.engine): the run's base model by default, another local
model, or an OpenAI-compatible endpoint whose key is read from an environment variable. Where the
backend has structured outputs (vLLM; servers that take response_format) the reply is constrained to
JUDGEMENT_SCHEMA, so it is the JSON asked for. A reply that is not (other backends, or a reply cut
by judge.max_new_tokens) is asked again (the first try greedy, the next sampled); after judge.max_tries tries it is
recorded as failed with its last reply, and failures are counted in the summary.
"""
from __future__ import annotations

import json
import re
from statistics import mean
from typing import Callable

from slkit.core.params import JudgeParams, SamplingParams
from slkit.core.records import RecordWriter
from slkit.core.schema import Judgement
from slkit.engines.base import Engine, Request, stable_seed
from slkit.engines.jobs import Job, run_jobs

DIMENSIONS = ("relevance", "coherence", "accuracy", "consistency", "clarity", "creativity", "engagement")

JUDGE_PROMPT = """You are grading one response to a writing request. Give it a score from 1 (very poor) to 10 \
(excellent) on each of these seven dimensions:
- relevance: it does what the request asks;
- coherence: its parts connect and its structure is easy to follow;
- accuracy: what it states as fact is correct;
- consistency: it does not contradict itself and keeps one voice and style;
- clarity: its sentences are clear and precise;
- creativity: it brings original ideas, images or angles;
- engagement: it holds a reader's interest.
Judge the writing only: do not reward or penalise the response for its length. The request and the
response may be in English or Chinese.
Reply with one JSON object and nothing else, in this form, each N an integer from 1 to 10:
{{"relevance": N, "coherence": N, "accuracy": N, "consistency": N, "clarity": N, "creativity": N, "engagement": N}}

Request:
{query}

Response:
{response}"""

# Base models (no chat template) get the start of the answer, so they continue the JSON. The form
# above holds no numbers on purpose: a model that copies it (the 270m demo model copied a numeric
# example verbatim for every response) writes no valid JSON and is counted as failed.
BASE_MODEL_PREFILL = '{"relevance":'

# The reply the judge must give, as a JSON schema: each dimension an integer from 1 to 10, nothing else.
JUDGEMENT_SCHEMA = {
    "type": "object",
    "properties": {dim: {"type": "integer", "minimum": 1, "maximum": 10} for dim in DIMENSIONS},
    "required": list(DIMENSIONS),
    "additionalProperties": False,
}

_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


def parse_judgement(text: str) -> dict[str, float] | None:
    """The seven scores from a judge reply, or None when no JSON object in it holds all seven as
    numbers from 1 to 10. Code fences and text around the object are ignored; keys are case-blind."""
    for candidate in _OBJECT.findall(text):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        scores = {str(k).strip().lower(): v for k, v in data.items()}
        values = {}
        for dim in DIMENSIONS:
            v = scores.get(dim)
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    v = None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 10:
                break
            values[dim] = float(v)
        else:
            return values
    return None


def judge_responses(engine: Engine, items: list[dict], jp: JudgeParams, seed: int, writer: RecordWriter,
                    on_done: Callable[[int], None] | None = None) -> None:
    """Append one record per item ({"index", "sample", "query", "output"}) to `writer`: its scores, or
    failed with the last reply. Items already in the writer (a resumed stage) are skipped. Each item is a job
    (slkit.engines.jobs) that asks again as soon as its reply was not the JSON asked for."""

    def judge_job(it: dict) -> Job:
        for try_index in range(1, jp.max_tries + 1):
            # Asked again each try: an endpoint that refused the schema stops offering structured outputs.
            structured = getattr(engine, "structured_outputs", False)
            # A schema-constrained reply starts the object itself, so it gets no pre-filled start.
            prefill = "" if engine.is_chat or structured else BASE_MODEL_PREFILL
            sampling = SamplingParams(temperature=0.0 if try_index == 1 else 0.7, top_p=0.95, top_k=0,
                                      repetition_penalty=1.0, max_new_tokens=jp.max_new_tokens, stop=[])
            reply = yield (Request(engine.render(JUDGE_PROMPT.format(query=it["query"], response=it["output"])), None,
                                   jp.max_new_tokens, stable_seed(seed, "judge", it["index"], it["sample"], try_index),
                                   prefill=prefill, json_schema=JUDGEMENT_SCHEMA if structured else None), sampling)
            scores = parse_judgement(prefill + reply)
            if scores is not None or try_index == jp.max_tries:
                break
        writer.write(Judgement(index=it["index"], sample=it["sample"], scores=scores,
                               mean=round(mean(scores.values()), 4) if scores else None, tries=try_index,
                               failed=scores is None, last_reply=None if scores else (prefill + reply)[:500]))
        if on_done:
            on_done(1)

    done = {(r["index"], r["sample"]) for r in writer.records}
    run_jobs(engine, [judge_job(it) for it in items if (it["index"], it["sample"]) not in done])


def summarize_judgements(records: list[dict]) -> dict:
    """Mean score per dimension and overall over the judged responses; judged and failed counts."""
    ok = [r for r in records if not r["failed"]]
    return {
        "per_dimension": {d: round(mean(r["scores"][d] for r in ok), 3) for d in DIMENSIONS} if ok else {},
        "overall": round(mean(r["mean"] for r in ok), 3) if ok else None,
        "judged": len(ok),
        "failed": len(records) - len(ok),
        "failure_rate": round((len(records) - len(ok)) / len(records), 4) if records else None,
    }
