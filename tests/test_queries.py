from slkit.running.params import params_from_dict
from slkit.method.prompts import parse_judge, parse_self_instruct, self_instruct_prompt
from slkit.method.queries import NearDuplicateIndex, synthesize_queries
from slkit.running.records import RecordWriter


def test_self_instruct_prompt_and_parse():
    prompt = self_instruct_prompt(["Write A.", "Write B."], "en")
    assert prompt.endswith("Instruction 1: Write A.\nInstruction 2: Write B.\nInstruction 3:")
    assert parse_self_instruct(" Write C in detail.\nInstruction 4: more", "en") == "Write C in detail."
    assert parse_self_instruct(" Write C. Instruction 4: D", "en") == "Write C."
    assert self_instruct_prompt(["写A。", "写B。"], "zh").endswith("指令3：")
    assert parse_self_instruct("写一篇长文。指令4：别的", "zh") == "写一篇长文。"


def test_parse_judge():
    assert parse_judge(" Yes, it is.") is True
    assert parse_judge("no.") is False
    assert parse_judge("是的，适合。") is True
    assert parse_judge("否") is False and parse_judge("不适合") is False
    assert parse_judge("maybe") is None


def test_near_duplicates():
    index = NearDuplicateIndex(0.8)
    index.add("Write a detailed history of the bicycle.")
    assert index.is_duplicate("write a detailed history of the bicycle!")
    assert not index.is_duplicate("Compose a poem about autumn rain in the mountains.")


def test_synthesis_filters_length_duplicates_and_judge(tmp_path, scripted_engine):
    params = params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"},
                               "queries": {"per_language": 2, "languages": ["en"], "max_tries": 5}})
    script = iter([
        # round 1: slot 0 too short (2 words < 3), slot 1 duplicate of a seed
        " Write.", " Write a long guide to balcony gardening.",
        # round 2: two good candidates; the judge says no to the first
        " Describe the history of glassmaking in Venice at length.", " Explain how tides work, in depth.",
        # round 3: slot 0 again
        " Write a long report on bee colonies and pollination.",
    ])
    judge = iter(["no", "yes", "yes"])

    def answer(request):
        return next(judge) if request.prompt.endswith("Answer:") else next(script)

    pool = [{"query": "Write a long guide to balcony gardening.", "language": "en"},
            {"query": "Draft a detailed travel plan for Kyoto.", "language": "en"}]
    writer = RecordWriter(tmp_path / "q.jsonl")
    rejected = synthesize_queries(scripted_engine(answer), pool, [], params, 1, writer)
    records = writer.finish()
    assert [r["query"] for r in records] == ["Explain how tides work, in depth.",
                                             "Write a long report on bee colonies and pollination."]
    assert rejected == {"length": 1, "duplicate": 1, "judge_no": 1}
    assert [r["tries"] for r in records] == [2, 3]


def test_per_language_queries_in_every_language(tmp_path, scripted_engine):
    # the reference generates its budget in each language's run: per_language is a count per language
    params = params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"},
                               "queries": {"per_language": 3, "judge": False}})
    topics = iter(range(100))

    def answer(request):
        n = next(topics)
        return f"请写一篇关于第{n}号城市河流变迁的长文。" if request.prompt.endswith("指令3：") else \
            f" Write a long history of harbour number {n} and its ships."

    pool = [{"query": q, "language": "en"} for q in ("Write a long guide to tea.", "Draft a detailed plan for Kyoto.")]
    pool += [{"query": q, "language": "zh"} for q in ("请写一篇关于茶文化的长文。", "请详细介绍京都的旅行计划。")]
    writer = RecordWriter(tmp_path / "q.jsonl")
    synthesize_queries(scripted_engine(answer), pool, [], params, 1, writer)
    records = writer.finish()
    assert sorted(r["language"] for r in records) == ["en"] * 3 + ["zh"] * 3
