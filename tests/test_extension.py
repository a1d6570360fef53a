from collections import Counter

from slkit.extension import extend_drafts, former_part, keep_head
from slkit.params import params_from_dict
from slkit.records import RecordWriter
from slkit.textstats import count_words


def _params(**extension):
    return params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"},
                             "extension": extension})


def test_former_part_is_first_half_of_paragraphs():
    assert former_part("p1\n\np2\n\np3\n\np4") == "p1\n\np2"
    assert former_part("p1\n\np2\n\np3") == "p1"
    assert former_part("l1\nl2\nl3\nl4") == "l1\n\nl2"  # <= 2 paragraphs: lines
    assert former_part("single.") == "single."


def test_keep_head_keeps_two_thirds():
    six = "\n\n".join(f"p{i}" for i in range(6))
    assert keep_head(six, 2 / 3) == "p0\n\np1\n\np2\n\np3"
    assert keep_head("p0\n\np1\n\np2\n\np3\n\np4", 2 / 3) == "p0\n\np1\n\np2\n\np3"  # ceil(10/3) = 4
    assert keep_head("", 2 / 3) == ""


def _draft(words):
    text = " ".join(f"w{i}" for i in range(words - 1)) + " end."
    return {"id": "q0-d0", "query_id": "q0", "query": "Write long.", "language": "en", "draft": text,
            "words": count_words(text)}


def test_two_stage_extension_builds_kept_part_plus_continuation(tmp_path, scripted_engine):
    def answer(request):
        if "Passage:" in request.prompt:  # stage 1: six paragraphs, first four are kept
            return "\n\n".join(f"Enriched part {i} here." for i in range(6))
        return "A fresh continuation sentence with words."  # stage 2 continuation

    engine = scripted_engine(answer)
    writer = RecordWriter(tmp_path / "ext.jsonl")
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=1), 1, writer, _params().quality)
    [record] = writer.finish()
    kept = "\n\n".join(f"Enriched part {i} here." for i in range(4))
    assert record["extended"] == kept + "\n\nA fresh continuation sentence with words."
    assert record["words"] == count_words(record["extended"]) and record["words"] > 1.2 * 10
    stage2 = [r for r in engine.requests if "Passage:" not in r.prompt]
    # stage 2 sees the query and the whole current text, and is pre-filled with the kept part
    assert "Write long." in stage2[0].prompt and _draft(10)["draft"] in stage2[0].prompt
    assert stage2[0].prefill == kept + "\n\n" and stage2[0].prompt.endswith("</user>\n")
    assert all(r.role == "extender" for r in engine.requests)
    assert counts["accepted"] == 1


def test_extension_not_long_enough_is_retried_then_dropped(tmp_path, scripted_engine):
    engine = scripted_engine(lambda r: "Short." if "Passage:" in r.prompt else "Tiny bit.")
    writer = RecordWriter(tmp_path / "ext.jsonl")
    # draft has 10 words; kept "Short." + "Tiny bit." = 3 words, never > 1.2 x 10
    counts = extend_drafts(engine, [_draft(10)], _params(micro_iterations=2, max_tries=3), 1, writer,
                           _params().quality)
    assert writer.finish() == []
    assert counts == Counter({"round_rejected_not_longer": 6, "retried": 2, "gave_up": 1})
    assert len(engine.requests) == 2 * 2 * 3  # 2 stages x 2 rounds x 3 tries


def test_rounds_build_on_the_best_accepted_text(tmp_path, scripted_engine):
    calls = {"n": 0}

    def answer(request):
        if "Passage:" in request.prompt:
            return ""
        calls["n"] += 1
        # round 1: longer and clean; round 2: longer but unfinished (rejected); round 3: longer again
        return {1: "one two three four five six seven eight nine ten eleven twelve.",
                2: "this text is even longer but never ends with punctuation at all right",
                3: "a b c d e f g h i j k l m n o p q r s t u v w x y z."}[calls["n"]]

    engine = scripted_engine(answer)
    writer = RecordWriter(tmp_path / "ext.jsonl")
    counts = extend_drafts(engine, [_draft(5)], _params(micro_iterations=3), 1, writer, _params().quality)
    [record] = writer.finish()
    assert record["extended"].startswith("a b c") and record["rounds_accepted"] == 2
    assert counts["round_rejected_unfinished"] == 1
    # round 3 was shown round 1's text (the best so far), not round 2's rejected one
    round3 = [r for r in engine.requests if "Passage:" not in r.prompt][2]
    assert "eleven twelve." in round3.prompt and "right" not in round3.prompt
