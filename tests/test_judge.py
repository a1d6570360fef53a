"""The quality judge: its parser on good and broken replies, retries, and failures counted, never dropped."""
import json

import pytest

from slkit.evaluation.judge import (BASE_MODEL_PREFILL, DIMENSIONS, parse_judgement, judge_responses, summarize_judgements)
from slkit.core.params import JudgeParams
from slkit.core.records import RecordWriter

GOOD = {d: i + 3 for i, d in enumerate(DIMENSIONS)}  # 3..9


@pytest.mark.parametrize("reply", [
    json.dumps(GOOD),
    "Here is my grading:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nThanks.",
    json.dumps({k.upper(): str(v) for k, v in GOOD.items()}),  # keys in capitals, numbers as strings
    '{"note": "draft"} ' + json.dumps(GOOD),                    # the first object is not the grading
])
def test_good_replies_parse(reply):
    assert parse_judgement(reply) == {k: float(v) for k, v in GOOD.items()}


@pytest.mark.parametrize("reply", [
    "",
    "I would rate this 7 out of 10.",
    json.dumps({**GOOD, "engagement": 11}),                      # out of range
    json.dumps({k: v for k, v in GOOD.items() if k != "clarity"}),  # a dimension missing
    json.dumps({**GOOD, "accuracy": "high"}),
    json.dumps({**GOOD, "accuracy": True}),
    '{"relevance": 7, "coherence": 8,',                          # cut off
])
def test_broken_replies_are_none(reply):
    assert parse_judgement(reply) is None


def _items(n):
    return [{"index": i, "sample": 0, "query": f"q{i}", "output": f"text {i}"} for i in range(n)]


def test_a_bad_reply_is_retried_then_counted_as_failed(tmp_path, scripted_engine):
    calls = {}

    def answer(request):
        i = int(request.prompt.split("Response:\ntext ")[1].split("<")[0])
        calls[i] = calls.get(i, 0) + 1
        if i == 0:
            return json.dumps(GOOD)                              # fine at once
        if i == 1:
            return "no idea" if calls[i] == 1 else json.dumps(GOOD)  # fine on the second try
        return "never JSON"                                      # fails every try

    engine = scripted_engine(answer)
    engine.is_chat = True
    with RecordWriter(tmp_path / "judgements.jsonl") as writer:
        judge_responses(engine, _items(3), JudgeParams(enabled=True, max_tries=3), 0, writer)
        records = {r["index"]: r for r in writer.finish()}
    assert (records[0]["tries"], records[1]["tries"], records[2]["tries"]) == (1, 2, 3)
    assert records[2]["failed"] and records[2]["scores"] is None and records[2]["last_reply"] == "never JSON"
    assert records[1]["mean"] == pytest.approx(6.0)
    assert "do not reward or penalise the response for its length" in engine.requests[0].prompt
    summary = summarize_judgements(list(records.values()))
    assert summary["judged"] == 2 and summary["failed"] == 1 and summary["failure_rate"] == round(1 / 3, 4)
    assert summary["per_dimension"]["relevance"] == 3.0 and summary["overall"] == 6.0


def test_base_models_get_the_start_of_the_json(tmp_path, scripted_engine):
    engine = scripted_engine(lambda r: " 5, " + ", ".join(f'"{d}": 6' for d in DIMENSIONS[1:]) + "}")
    with RecordWriter(tmp_path / "j.jsonl") as writer:
        judge_responses(engine, _items(1), JudgeParams(enabled=True), 0, writer)
        [record] = writer.finish()
    assert engine.requests[0].prefill == BASE_MODEL_PREFILL
    assert record["scores"]["relevance"] == 5.0 and record["scores"]["engagement"] == 6.0


def test_a_resumed_judge_skips_what_it_judged(tmp_path, scripted_engine):
    engine = scripted_engine(lambda r: json.dumps(GOOD))
    engine.is_chat = True
    writer = RecordWriter(tmp_path / "j.jsonl")
    judge_responses(engine, _items(2), JudgeParams(enabled=True), 0, writer)  # not finished: a "killed" stage
    writer._file.close()
    engine.requests.clear()
    with RecordWriter(tmp_path / "j.jsonl") as writer:
        judge_responses(engine, _items(3), JudgeParams(enabled=True), 0, writer)
        assert len(writer.finish()) == 3
    assert len(engine.requests) == 1


def test_a_copied_form_is_not_a_judgement():
    """The prompt's form holds no numbers, so a model that copies it is counted as failed."""
    from slkit.evaluation.judge import JUDGE_PROMPT

    form = next(line for line in JUDGE_PROMPT.splitlines() if line.startswith("{"))
    assert parse_judgement(form.replace("{{", "{").replace("}}", "}")) is None
    assert not any(ch.isdigit() for ch in form)


def test_a_judge_on_vllm_asks_for_the_json_schema_through_structured_outputs(tmp_path, smoke_params, fake_vllm):
    """The fake vLLM answers a request that carries a JSON schema with an object that follows it, as vLLM's
    structured outputs do, and its words otherwise: every reply is a judgement at the first try, and no reply
    is pre-filled (the schema starts the object itself)."""
    from slkit.engines.vllm import VLLMEngine
    from slkit.evaluation.judge import JUDGEMENT_SCHEMA

    engine = VLLMEngine(smoke_params)  # the tiny model has no chat template: a base model would be pre-filled
    with RecordWriter(tmp_path / "j.jsonl") as writer:
        judge_responses(engine, _items(3), JudgeParams(enabled=True, max_tries=3), 0, writer)
        records = writer.finish()
    assert [r["tries"] for r in records] == [1, 1, 1] and not any(r["failed"] for r in records)
    assert [asked["structured_outputs"] for asked in fake_vllm.asked] == [{"json": JUDGEMENT_SCHEMA}] * 3
    assert JUDGEMENT_SCHEMA["required"] == list(DIMENSIONS)
    assert all(d in JUDGEMENT_SCHEMA["properties"] for d in DIMENSIONS)


def test_an_engine_without_structured_outputs_gets_no_schema_and_keeps_the_retries(tmp_path, scripted_engine):
    engine = scripted_engine(lambda r: "not JSON")
    with RecordWriter(tmp_path / "j.jsonl") as writer:
        judge_responses(engine, _items(1), JudgeParams(enabled=True, max_tries=2), 0, writer)
        [record] = writer.finish()
    assert [r.json_schema for r in engine.requests] == [None, None] and record["failed"] and record["tries"] == 2
