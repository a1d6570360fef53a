import random
from collections import Counter

import pytest

from conftest import ScriptedEngine
from slkit.method.extensions import (extend_drafts, former_part, keep_head, kept_paragraphs, phase2_prefill,
                                     phase2_text)
from slkit.core.params import params_from_dict
from slkit.method.prompts import extension_prompt
from slkit.core.records import RecordWriter
from slkit.method.textstats import count_words
from slkit.method.training_sets import extender_examples


def _params(**extension):
    return params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"},
                             "extensions": extension})


class PhasedEngine(ScriptedEngine):
    """Answers extension phase-1 calls with phase1(request), phase-2 calls with phase2(request):
    extend_drafts makes one phase-1 call, then one phase-2 call, per micro-iteration. Keeps each phase's
    requests."""

    def __init__(self, phase1, phase2):
        super().__init__(None)
        self.answers = {1: phase1, 2: phase2}
        self.by_phase = {1: [], 2: []}
        self.calls = 0

    def generate(self, requests, sampling, on_done=None):
        phase = 1 + self.calls % 2
        self.calls += 1
        self.answer = self.answers[phase]
        self.by_phase[phase] += requests
        return super().generate(requests, sampling, on_done)


def test_former_part_is_first_half_of_paragraphs():
    assert former_part("p1\n\np2\n\np3\n\np4") == "p1\n\np2"
    assert former_part("p1\n\np2\n\np3") == "p1"
    assert former_part("l1\nl2\nl3\nl4") == "l1\n\nl2"  # <= 2 paragraphs: lines


def test_former_part_cuts_as_the_reference():
    # one line: half of one part is none (slkit kept the line)
    assert former_part("single.") == ""
    # the line split keeps the blank line between the two paragraphs as a part, as str.split does:
    # 4 parts ("l1", "l2", "", "p2"), the first 2 kept (slkit's stripped lines gave 3 parts and kept 1)
    assert former_part("l1\nl2\n\np2") == "l1\n\nl2"


@pytest.mark.parametrize("n, kept", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (6, 4), (8, 5)])
def test_keep_head_keeps_two_thirds_rounded_down(n, kept):
    # the reference keeps n*2//3: none of one paragraph
    text = "\n\n".join(f"p{i}" for i in range(n))
    assert keep_head(text, 2 / 3) == "\n\n".join(f"p{i}" for i in range(kept))


def test_keep_head_is_a_verbatim_prefix_split_on_blank_lines_only():
    # two paragraphs of several lines: the reference splits on blank lines only, never on lines, and keeps
    # the text as it was (slkit split lines here and joined them with blank lines)
    phase1 = "# Title\nline a\nline b\n\nSecond paragraph.\nMore."
    assert keep_head(phase1, 2 / 3) == "# Title\nline a\nline b"
    assert kept_paragraphs(phase1, 2 / 3) == 1
    # an empty piece between two blank lines counts, as in str.split: 5 pieces, 3 kept, spaces and all
    assert keep_head("a  \n\n\n\nb\n\nc\n\nd", 2 / 3) == "a  \n\n\n\nb"


def test_phase2_prefill_is_the_kept_head_and_the_new_text_joins_it():
    assert phase2_prefill("Kept head.") == "Kept head."  # nothing added (slkit added a blank line)
    assert phase2_text("Kept head.", "More text.") == "Kept head.\n\nMore text."
    assert phase2_text("", "More text.") == "More text."


def test_keep_head_floors_other_fractions_and_empty_text():
    hundred = "\n\n".join(f"p{i}" for i in range(100))
    assert len(keep_head(hundred, 0.29).split("\n\n")) == 29  # 0.29 x 100 is 28.999999999999996 in floats
    assert keep_head("p0\n\np1\n\np2", 0.5) == "p0"
    assert keep_head("", 2 / 3) == ""


def _draft(words, draft_id="q0-d0"):
    text = " ".join(f"w{i}" for i in range(words - 1)) + " end."
    return {"id": draft_id, "query_id": "q0", "query": "Write long.", "language": "en", "draft": text,
            "words": count_words(text)}


SIX = "\n\n".join(f"Enriched part {i} here." for i in range(6))


def test_one_template_serves_both_phases_and_the_extenders_training_set(tmp_path):
    draft = _draft(10)
    draft["draft"] = "First paragraph here.\n\nSecond paragraph here.\n\nThird paragraph ends."
    draft["words"] = count_words(draft["draft"])
    engine = PhasedEngine(lambda r: SIX, lambda r: "A fresh continuation sentence with many more words in it.")
    extend_drafts(engine, [draft], _params(micro_iterations=1, samples_per_draft=1), 1,
                  RecordWriter(tmp_path / "ext.jsonl"), _params().quality)
    [phase1], [phase2] = engine.by_phase[1], engine.by_phase[2]
    # phase 1: the template with the query and the former part (the old prompt had no query)
    assert phase1.prompt == engine.render(extension_prompt("Write long.", "First paragraph here.", "en"))
    assert phase1.prefill == ""
    # phase 2: the same template with the whole text, answer pre-filled with the kept part (4 of 6)
    assert phase2.prompt == engine.render(extension_prompt("Write long.", draft["draft"], "en"))
    assert phase2.prefill == "\n\n".join(f"Enriched part {i} here." for i in range(4))  # verbatim, nothing added
    # the Extender is trained on that same template (no line dropped with keep_prob 1)
    [example] = extender_examples([{"id": "a", "query": "Write long.", "language": "en", "draft": draft["draft"],
                                    "extended": "x."}], 1.0, random.Random(0))
    assert example["prompt"] == extension_prompt("Write long.", draft["draft"], "en")
    assert all(r.role == "extender" for r in engine.requests)


def test_two_phase_extension_builds_kept_part_plus_continuation(tmp_path):
    engine = PhasedEngine(lambda r: SIX, lambda r: "A fresh continuation sentence with words.")
    writer = RecordWriter(tmp_path / "ext.jsonl")
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=1, samples_per_draft=1), 1, writer,
                           _params().quality)
    [record] = writer.finish()
    kept = "\n\n".join(f"Enriched part {i} here." for i in range(4))
    assert record["extended"] == kept + "\n\nA fresh continuation sentence with words."
    assert record["words"] == count_words(record["extended"]) and record["words"] > 1.2 * 10
    assert record["id"] == "q0-d0-x0" and record["draft_id"] == "q0-d0" and record["sample"] == 0
    assert counts["accepted"] == 1


@pytest.mark.parametrize("words, kept", [(12, False), (13, True)])
def test_extension_must_be_more_than_1_2_times_the_draft(tmp_path, words, kept):
    # a 10-word draft: 12 words is exactly 1.2x (refused), 13 is more (kept)
    continuation = " ".join(f"v{i}" for i in range(words - 1)) + " done."
    engine = PhasedEngine(lambda r: "", lambda r: continuation)
    writer = RecordWriter(tmp_path / "ext.jsonl")
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=1, max_tries=1, samples_per_draft=1), 1,
                           writer, _params().quality)
    records = writer.finish()
    assert count_words(continuation) == words and counts["micro_iteration_accepted"] == 1
    assert [r["words"] for r in records] == ([words] if kept else [])
    assert counts["gave_up"] == (0 if kept else 1)


def test_extension_not_long_enough_is_retried_then_dropped(tmp_path):
    engine = PhasedEngine(lambda r: "Short.", lambda r: "Tiny bit.")
    writer = RecordWriter(tmp_path / "ext.jsonl")
    # draft has 10 words; kept "Short." + "Tiny bit." = 3 words, never > 1.2 x 10
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=2, max_tries=3, samples_per_draft=1), 1,
                           writer, _params().quality)
    assert writer.finish() == []
    assert counts == Counter({"micro_iteration_rejected_not_longer": 6, "retried": 2, "gave_up": 1})
    assert len(engine.requests) == 2 * 2 * 3  # 2 phases x 2 micro-iterations x 3 tries


def test_each_draft_gets_independent_jobs_with_their_own_tries(tmp_path):
    engine = PhasedEngine(lambda r: "Short.", lambda r: "Tiny bit.")
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=1, max_tries=3), 1,
                           RecordWriter(tmp_path / "ext.jsonl"), _params().quality)
    # samples_per_draft defaults to 2: two jobs, each with up to max_tries (3) tries of its own
    assert counts == Counter({"micro_iteration_rejected_not_longer": 6, "retried": 4, "gave_up": 2})
    first_micro_iterations = engine.by_phase[1][:2]
    assert len({r.seed for r in first_micro_iterations}) == 2  # the jobs draw different samples


def test_jobs_write_distinct_records_and_a_resumed_stage_runs_only_the_missing_job(tmp_path):
    long_text = "\n\n".join(f"Paragraph {i} with enough words in it." for i in range(3))
    engine = PhasedEngine(lambda r: long_text, lambda r: "And a continuation that ends.")
    writer = RecordWriter(tmp_path / "ext.jsonl")
    extend_drafts(engine, [_draft(10)], _params(micro_iterations=1), 1, writer, _params().quality)
    records = writer.finish()
    assert sorted(r["id"] for r in records) == ["q0-d0-x0", "q0-d0-x1"]
    assert [r["sample"] for r in sorted(records, key=lambda r: r["id"])] == [0, 1]

    # a stage killed after job x1 finished: its .partial holds x1, the resumed stage runs x0 only
    partial = tmp_path / "resumed.jsonl"
    with RecordWriter(partial) as killed:
        killed.write(next(r for r in records if r["id"] == "q0-d0-x1"))
    resumed_engine = PhasedEngine(lambda r: long_text, lambda r: "And a continuation that ends.")
    resumed = RecordWriter(partial)
    counts = extend_drafts(resumed_engine, [_draft(10)], _params(micro_iterations=1), 1, resumed, _params().quality)
    assert sorted(r["id"] for r in resumed.finish()) == ["q0-d0-x0", "q0-d0-x1"]
    assert counts["accepted"] == 1 and len(resumed_engine.requests) == 2  # one job, one micro-iteration, two phases
    # the resumed job drew the seeds it drew in the uninterrupted run
    assert {r.seed for r in resumed_engine.requests} < {r.seed for r in engine.requests}


def test_micro_iterations_build_on_the_best_accepted_text(tmp_path):
    calls = {"n": 0}

    def phase2(request):
        calls["n"] += 1
        # micro-iteration 1: longer and clean; 2: longer but unfinished (rejected); 3: longer again
        return {1: "one two three four five six seven eight nine ten eleven twelve.",
                2: "this text is even longer but never ends with punctuation at all right",
                3: "a b c d e f g h i j k l m n o p q r s t u v w x y z."}[calls["n"]]

    engine = PhasedEngine(lambda r: "", phase2)
    writer = RecordWriter(tmp_path / "ext.jsonl")
    counts = extend_drafts(engine, [_draft(5)], _params(micro_iterations=3, samples_per_draft=1), 1, writer,
                           _params().quality)
    [record] = writer.finish()
    assert record["extended"].startswith("a b c") and record["micro_iterations_accepted"] == 2
    assert counts["micro_iteration_rejected_unfinished"] == 1
    # micro-iteration 3 was shown micro-iteration 1's text (the best so far), not 2's rejected one
    third = engine.by_phase[2][2]
    assert "eleven twelve." in third.prompt and "right" not in third.prompt
