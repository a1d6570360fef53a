from slkit.core.params import params_from_dict
from slkit.method.prompts import (SELF_INSTRUCT_TASK, judge_prompt, parse_judge, parse_self_instruct,
                                  self_instruct_list, self_instruct_prompt)
from slkit.method.queries import (NearDuplicateIndex, judge_request, judge_sampling, self_instruct_request,
                                  synthesize_queries)
from slkit.core.records import RecordWriter


def test_self_instruct_prompt_and_parse():
    prompt = self_instruct_prompt(["Write A.", "Write B."], "en")
    # the reference's label ends in a space
    assert prompt.endswith("Instruction 1: Write A.\nInstruction 2: Write B.\nInstruction 3: ")
    assert parse_self_instruct(" Write C in detail.\nInstruction 4: more", "en") == "Write C in detail."
    assert self_instruct_prompt(["写A。", "写B。"], "zh").endswith("指令3：")
    assert parse_self_instruct("写一篇长文。\n指令4：别的", "zh") == "写一篇长文。"


def test_self_instruct_keeps_every_line_of_a_query_and_the_examples_as_written():
    # the reference keeps the whole completion up to its stop string "\nInstruction 4" (slkit kept the first line)
    table = "Write a story inspired by this table:\n| Time | Event |\n| 6:00 | Sunrise |"
    assert parse_self_instruct(f"{table}\nInstruction 4: Write more.", "en") == table
    assert parse_self_instruct("写一篇文章，要求：\n1. 分三部分\n2. 有结论\n指令4：别的", "zh") == \
        "写一篇文章，要求：\n1. 分三部分\n2. 有结论"
    # examples are shown as written, line breaks and all (slkit flattened them to one line)
    assert self_instruct_list([table, "Write B."], "en") == f"Instruction 1: {table}\nInstruction 2: Write B.\nInstruction 3: "


def test_self_instruct_is_a_chat_turn_whose_answer_starts_with_the_examples(scripted_engine):
    chat = scripted_engine(lambda r: "")
    chat.is_chat = True
    request = self_instruct_request(chat, ["Write A.", "Write B."], "en", 64, 7)
    assert request.prompt == chat.render(SELF_INSTRUCT_TASK["en"]) and request.seed == 7
    assert request.prefill == "Instruction 1: Write A.\nInstruction 2: Write B.\nInstruction 3: "
    plain = self_instruct_request(scripted_engine(lambda r: ""), ["Write A.", "Write B."], "en", 64, 7)
    assert plain.prompt == self_instruct_prompt(["Write A.", "Write B."], "en") and plain.prefill == ""


def test_parse_judge_needs_an_exact_yes():
    assert parse_judge(" Yes ", "en") is True and parse_judge("yes", "en") is True
    assert parse_judge("是", "zh") is True and parse_judge(" 是\n", "zh") is True
    assert parse_judge("no", "en") is False and parse_judge("否", "zh") is False
    # the reference keeps a query only on the exact word (slkit read any answer that began with it)
    for answer, language in [("Yes, it is.", "en"), ("yes.", "en"), ("是的，适合。", "zh"), ("适合", "zh"),
                             ("是", "en"), ("yes", "zh"), ("maybe", "en")]:
        assert parse_judge(answer, language) is None, answer


def test_the_judge_is_zero_shot_and_samples_with_the_runs_decoding(scripted_engine):
    chat = scripted_engine(lambda r: "")
    chat.is_chat = True
    request = judge_request(chat, "Write a long history\nof tea.", "en", 5)
    assert request.prompt == chat.render(judge_prompt("Write a long history\nof tea.", "en"))
    assert "Request:" not in request.prompt and "Write a long history\nof tea." in request.prompt
    sampling = params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"}}).sampling
    judging = judge_sampling(sampling, is_chat=True)
    assert (judging.temperature, judging.top_p, judging.top_k) == (0.7, 0.8, 20)  # not greedy
    assert judging.stop == sampling.stop
    # a model without a chat template gets few-shot examples, and its answer stops at the line's end
    plain = judge_request(scripted_engine(lambda r: ""), "Write long.", "en", 5)
    assert plain.prompt.endswith("Request: Write long.\nAnswer:") and "\n" in judge_sampling(sampling, False).stop


def test_near_duplicates():
    index = NearDuplicateIndex(0.8)
    index.add("Write a detailed history of the bicycle.")
    assert index.is_duplicate("write a detailed history of the bicycle!")
    assert not index.is_duplicate("Compose a poem about autumn rain in the mountains.")


def test_synthesis_filters_length_duplicates_and_judge(tmp_path, scripted_engine):
    params = params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"},
                               "queries": {"per_language": 2, "languages": ["en"], "max_tries": 5}})
    script = iter([
        # batch 1: slot 0 too short (2 words < 3), slot 1 duplicate of a seed
        " Write.", " Write a long guide to balcony gardening.",
        # batch 2: two good candidates; the judge says no to the first
        " Describe the history of glassmaking in Venice at length.", " Explain how tides work, in depth.",
        # batch 3: slot 0 again
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
        return f"请写一篇关于第{n}号城市河流变迁的长文。" if request.text.endswith("指令3：") else \
            f" Write a long history of harbour number {n} and its ships."

    pool = [{"query": q, "language": "en"} for q in ("Write a long guide to tea.", "Draft a detailed plan for Kyoto.")]
    pool += [{"query": q, "language": "zh"} for q in ("请写一篇关于茶文化的长文。", "请详细介绍京都的旅行计划。")]
    writer = RecordWriter(tmp_path / "q.jsonl")
    synthesize_queries(scripted_engine(answer), pool, [], params, 1, writer)
    records = writer.finish()
    assert sorted(r["language"] for r in records) == ["en"] * 3 + ["zh"] * 3
