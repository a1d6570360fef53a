"""The lessons' showing functions on records with known content, and the records they need: every extension
round in extensions.jsonl, the prompt and verdicts of every query. The notebooks themselves run in
tests/test_pipeline.py (the smoke run)."""
import random

from conftest import ScriptedEngine
from slkit.lessons import params_table, quality_table
from slkit.lessons import evaluation as evaluation_lesson
from slkit.lessons import extensions as extensions_lesson
from slkit.lessons import length_control as length_control_lesson
from slkit.lessons import queries as queries_lesson
from slkit.lessons import training as training_lesson
from slkit.method.extensions import extend_drafts
from slkit.method.prompts import self_instruct_list, self_instruct_prompt
from slkit.method.quality import quality_failure
from slkit.method.queries import synthesize_queries
from slkit.method.textstats import count_words
from slkit.method.training_sets import drop_lines, extender_examples
from slkit.core.params import params_from_dict
from slkit.core.records import RecordWriter
from test_extensions import StagedEngine


def _params(**sections):
    return params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"}, **sections})


DRAFT = {"id": "it1-q0-d0", "query_id": "it1-q0", "query": "Write about rivers.", "language": "en",
         "draft": "Rivers run far.\n\nThey feed the sea.", "words": 7}


CONTINUATIONS = ["one two three four.", "and then it never ends", " ".join(f"c{i}" for i in range(15)) + ".",
                 "short."]


def _scripted_extension(tmp_path):
    """One job of two rounds and two attempts: attempt 1 accepts round 1, rejects round 2 (unfinished) and ends
    below the length rule; attempt 2 accepts round 1 and rejects round 2 as not longer, and is kept."""
    stage1_calls = {"n": 0}
    continuations = iter(CONTINUATIONS)

    def stage1(request):
        stage1_calls["n"] += 1
        n = stage1_calls["n"]
        return f"Head {n} alpha.\n\nHead {n} beta.\n\nHead {n} gamma."  # 3 paragraphs: 2 kept

    engine = StagedEngine(stage1, lambda request: next(continuations))
    params = _params(extensions={"micro_iterations": 2, "max_tries": 2, "samples_per_draft": 1, "min_ratio": 2.0})
    writer = RecordWriter(tmp_path / "extensions.jsonl")
    extend_drafts(engine, [DRAFT], params, 1, writer, params.quality)
    [record] = writer.finish()
    return engine, params, record


def test_an_extension_record_holds_every_round_the_engine_wrote(tmp_path):
    engine, _, record = _scripted_extension(tmp_path)
    stage1 = [f"Head {n} alpha.\n\nHead {n} beta.\n\nHead {n} gamma." for n in range(1, 5)]
    assert [(r["attempt"], r["round"]) for r in record["rounds"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [r["stage1"] for r in record["rounds"]] == stage1
    assert [r["continuation"] for r in record["rounds"]] == CONTINUATIONS
    assert [r["kept_paragraphs"] for r in record["rounds"]] == [2, 2, 2, 2]
    assert [r["verdict"] for r in record["rounds"]] == ["accepted", "unfinished", "accepted", "not_longer"]
    # words of kept head (6 words) + continuation
    assert [r["words"] for r in record["rounds"]] == [10, 11, 21, 7]
    assert record["attempts"] == 2 and record["words"] == 21 and record["rounds_accepted"] == 1


def test_replay_rebuilds_the_prompts_and_prefills_the_extender_saw(tmp_path):
    engine, _, record = _scripted_extension(tmp_path)
    rounds = extensions_lesson.replay(record)
    for r, request in zip(rounds, engine.by_stage[1]):
        assert request.prompt == engine.render(r["stage1_prompt"])
    for r, request in zip(rounds, engine.by_stage[2]):
        assert request.prompt == engine.render(r["stage2_prompt"]) and request.prefill == r["prefill"]
    # each attempt starts from the draft; an accepted round's text is the next round's input
    assert [r["input"] for r in rounds] == [DRAFT["draft"], rounds[0]["new_text"], DRAFT["draft"], rounds[2]["new_text"]]
    assert rounds[0]["kept"] == "Head 1 alpha.\n\nHead 1 beta."
    assert [r["best_before"] for r in rounds] == [7, 10, 7, 21]
    table = extensions_lesson.rounds_table(record)
    assert list(table["verdict"]) == ["accepted", "unfinished", "accepted", "not_longer"]
    assert list(table["kept paragraphs"]) == ["2 of 3"] * 4


def test_the_extension_walkthrough_shows_each_round_and_the_length_rule(tmp_path):
    _, params, record = _scripted_extension(tmp_path)
    text = extensions_lesson.walkthrough(record, params).data
    assert f"Record `{record['id']}`" in text
    for r in record["rounds"]:
        assert r["stage1"] in text and r["continuation"] in text
    assert "verdict: unfinished" in text and "verdict: not_longer" in text
    assert "21 words > 2.0 x 7 = 14.0: kept" in text
    summary = {"drafts": 3, "resampled_drafts": 2, "jobs": 2, "extensions": 1,
               "counts": {"gave_up": 1, "retried": 3, "round_accepted": 2, "round_rejected_repetition": 5}}
    assert "1 gave up" in extensions_lesson.jobs_summary(summary).data
    assert extensions_lesson.round_verdicts(summary)["rounds"].to_dict() == {"rejected_repetition": 5, "accepted": 2}


def test_a_query_record_holds_its_prompt_completion_and_judge_answer(tmp_path):
    params = _params(queries={"per_language": 1, "languages": ["en"], "max_tries": 3})
    completions = iter([" Write.", " Explain how tides work, in depth.", " Describe the history of glassmaking in Venice at length.\nInstruction 4: x"])
    judge = iter(["no", " yes"])

    def answer(request):
        return next(judge) if request.prompt.endswith("Answer:") else next(completions)

    engine = ScriptedEngine(answer)
    pool = [{"query": q, "language": "en"} for q in ("Write a long guide to tea.", "Draft a detailed plan for Kyoto.",
                                                     "Tell the story of a lighthouse keeper.")]
    writer = RecordWriter(tmp_path / "queries.jsonl")
    synthesize_queries(engine, pool, [], params, 1, writer)
    [record] = writer.finish()
    prompts = [r.prompt for r in engine.requests if not r.prompt.endswith("Answer:")]
    assert record["tries"] == 3 and self_instruct_prompt(record["exemplars"], "en") == prompts[2]
    assert record["completion"] == " Describe the history of glassmaking in Venice at length.\nInstruction 4: x"
    assert record["judge_answer"] == " yes"
    text = queries_lesson.walkthrough(tmp_path, params).data
    assert "Record `it1-q0`" in text and self_instruct_list(record["exemplars"], "en") in text
    assert record["completion"] in text
    assert "read as yes: kept" in text


def test_quality_table_shows_the_failing_check_and_the_verdict():
    params = _params()
    looping = "A river runs to the sea and the sea is wide. " * 2 + "Here is the revised version."
    table = quality_table(looping, "en", params.quality)
    assert table.loc["verdict", "what it saw"] == quality_failure(looping, "en", params.quality) == "repetition"
    assert not table.loc["no repeated 10-gram", "passed"]
    assert table.loc["no repeated 10-gram", "what it saw"].startswith("first repeated: A river runs")
    assert table.loc["no meta-talk at the edges", "what it saw"] == "revised, version"
    assert table.loc["ends cleanly", "passed"]


def test_params_table_shows_this_runs_value_beside_the_reference():
    table = params_table(_params(extensions={"micro_iterations": 2}), "extensions")
    assert table.loc["extensions.micro_iterations", "this run"] == "2"
    assert table.loc["extensions.micro_iterations", "reference"] == "3"
    assert table.loc["extensions.micro_iterations", "changed"]
    assert not table.loc["extensions.min_ratio", "changed"]
    assert {"resampling.coefficient", "quality.ngram_en", "sampling.top_p"} <= set(table.index)


def test_dropped_lines_are_the_draft_lines_missing_from_the_extender_prompt():
    draft = "\n".join(f"Line {i} of the draft." for i in range(12))
    item = {"id": "x", "query": "Write.", "language": "en", "draft": draft, "extended": "Longer."}
    [example] = extender_examples([item], 0.6, random.Random(3))
    kept = drop_lines(draft, 0.6, random.Random(3)).split("\n")
    expected = [line for line in draft.split("\n") if line not in kept]
    assert expected and training_lesson.dropped_lines(draft, example["prompt"], "Write.", "en") == expected


def test_the_length_score_is_shown_by_its_formula():
    below = {"words": 50, "interval": [80, 120], "score": 0.25, "required": 100}
    above = {"words": 150, "interval": [80, 120], "score": 0.5, "required": 100}
    assert evaluation_lesson.score_steps(below) == "L = 50 < a = 80: max(2 x 50 / 80 - 1, 0) = 0.250 (recorded: 0.250)"
    assert evaluation_lesson.score_steps(above).endswith("max(3 - 2 x 150 / 120, 0) = 0.500 (recorded: 0.500)")
    # A LongBench-Write output is written with "interval": null (the schema writes every field): its own formula.
    longbench = {"words": 100, "interval": None, "score": 100.0, "required": 100}
    assert evaluation_lesson.score_steps(longbench).startswith("y = 100, x = 100")
    assert length_control_lesson.describe({"kind": "about", "low": 100, "high": None}) == \
        "about 100 (accepted interval [80, 120])"
    assert count_words("one two") == 2
