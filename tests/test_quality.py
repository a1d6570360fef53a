from slkit.core.params import QualityParams
from slkit.method.quality import ends_cleanly, meta_window, quality_failure
from slkit.method.textstats import ngram_units


def test_clean_endings():
    for text in ["Done.", "Really?", "Wow!", 'He said "yes."', "(see above)", "code:\n```python\nx = 1\n```", "end.  \n"]:
        assert ends_cleanly(text, "en"), text
    for text in ["完成了。", "真的吗？", "他说：“好。”", "代码：\n```python\nx = 1\n```"]:
        assert ends_cleanly(text, "zh"), text
    for text in ["and then the", ""]:
        assert not ends_cleanly(text, "en"), text
    assert not ends_cleanly("结束了但是", "zh")


def test_each_language_ends_with_the_references_own_characters():
    # the reference's English set also takes , ; : - > and a backtick (slkit's one set rejected them)
    for text in ["list:", "a, b,", "see below;", "well -", "a -> b >", "use `x`"]:
        assert ends_cleanly(text, "en") and quality_failure(text, "en") is None, text
    # its Chinese set has no ASCII . ! ? " ' and no 」』》 (slkit's one set took them)
    for text in ["结束了.", "真的吗?", "好!", '他说"好"', "他说「好。」", "《红楼梦》"]:
        assert not ends_cleanly(text, "zh") and quality_failure(text, "zh") == "unfinished", text
    assert quality_failure("结束了.", "zh", QualityParams(ending_chars={"en": ".", "zh": "."})) is None


def test_repetition_english_uses_10_word_ngrams():
    ten = "one two three four five six seven eight nine ten"
    assert quality_failure(f"{ten} and {ten} end.", "en") == "repetition"
    nine = "one two three four five six seven eight nine"
    assert quality_failure(f"{nine} x {nine} y.", "en") is None


def test_repetition_chinese_uses_13_character_ngrams():
    thirteen = "春天来了花儿都开了小鸟在唱"
    assert len(thirteen) == 13
    assert quality_failure(f"{thirteen}，然后{thirteen}。", "zh") == "repetition"
    assert quality_failure(f"{thirteen[:12]}，然后{thirteen[:12]}。", "zh") is None


def test_meta_talk_in_english_edges_is_case_sensitive():
    body = "\nBody line one.\nBody two.\nBody three.\nBody four.\nBody five.\nThe end."
    assert quality_failure("Here is the revised essay." + body, "en") == "meta-talk"
    middle = "Start.\nLine.\nThis version of events is odd.\nMore.\nMore again.\nStill more.\nEnd here."
    assert quality_failure(middle, "en") is None
    # titles are not meta-talk: the reference matches the lower-case words case-sensitively
    for title in ("Incident Response Plan", "Version Control", "A Revised Budget", "Draft Guidelines"):
        assert quality_failure(f"# {title}" + body, "en") is None, title
    assert quality_failure("Here is the revised version" + body, "en") == "meta-talk"


def test_meta_talk_window_counts_blank_lines_as_the_reference():
    # "# Title", a blank line, then the body: the reference's head of 2 lines is the title and the blank line
    text = "# Title\n\nHere is the revised plan.\nBody.\nMore body.\nAnd more.\n\nLast line.\n\nThe end."
    assert quality_failure(text, "en") is None  # slkit searched the third line too and rejected it
    assert quality_failure(text.replace("# Title", "# A revised title"), "en") == "meta-talk"
    # at the end the last 3 lines are the last line, a blank line and "The end."
    assert quality_failure(text.replace("Last line.", "This version ends."), "en") == "meta-talk"
    assert quality_failure(text.replace("And more.", "This version ends."), "en") is None
    assert meta_window("a\n\nb\nc\n\nd", QualityParams()) == ["a", "", "c", "", "d"]


def test_meta_talk_includes_the_words_of_the_extension_template():
    body = "\nBody line one.\nBody two.\nBody three.\nBody four.\nBody five.\nThe end."
    assert quality_failure("Below is the enriched text." + body, "en") == "meta-talk"
    assert quality_failure(body.strip() + "\nI hope this longer outline helps.", "en") == "meta-talk"


def test_meta_talk_in_chinese_edges():
    body = "\n第一段正文。\n第二段正文。\n第三段正文。\n第四段正文。\n第五段正文。\n全文完。"
    for head in ("以下是修改后的文章：", "下面是扩写的内容。", "这是改写后的版本。", "我根据大纲写了新的文章。"):
        assert quality_failure(head + body, "zh") == "meta-talk", head
    assert quality_failure(body.strip() + "\n以上是扩写后的全文。", "zh") == "meta-talk"
    middle = "开头。\n第二行。\n这里谈到了改写历史的企图。\n第四行。\n第五行。\n第六行。\n结尾。"
    assert quality_failure(middle, "zh") is None
    assert quality_failure("这是一篇关于城市的文章 revised。", "zh") is None  # English words are not Chinese meta-talk


def test_chinese_text_ending_in_an_ellipsis_is_finished():
    for text in ("他望着远方，久久没有说话……", "故事就这样结束了…", "And so it goes…"):
        assert ends_cleanly(text, "zh"), text
        assert quality_failure(text, "zh") is None


def test_chinese_repetition_units_keep_quotes_and_ellipses():
    # the same 16 characters twice, once with CJK quotes / an ellipsis among them: the reference's units
    # keep those marks, so no 13 units repeat (dropping them made the two passages identical)
    plain = "他说春天来了，花儿都开了小鸟在唱"
    quoted = "他说“春天来了”，花儿都开了小鸟在唱"
    ellipsis = "他说春天来了……花儿都开了小鸟在唱"
    assert quality_failure(f"{quoted}。然后{plain}。", "zh") is None
    assert quality_failure(f"{ellipsis}。然后{plain.replace('，', '')}。", "zh") is None
    assert quality_failure(f"{plain}。然后{plain}。", "zh") == "repetition"


def test_chinese_repetition_units_are_the_references():
    # every non-ASCII character is a unit, a run of ASCII characters (spaces included) is one unit
    assert ngram_units("他说“好……”。GPT-4 model很好\n\n第二", "zh") == [
        "他", "说", "“", "好", "…", "…", "”", "。", "GPT-4 model", "很", "好", "\n\n", "第", "二"]


def test_rules_can_be_relaxed():
    assert quality_failure("no ending", "en") == "unfinished"
    assert quality_failure("no ending", "en", QualityParams(check_ending=False)) is None
    assert quality_failure("   ", "en") == "empty"


def test_a_refusal_is_too_short_when_min_words_is_set():
    from slkit.core.params import QualityParams

    refusal = "I'm sorry, but I can't assist with that request."
    assert quality_failure(refusal, "en") is None  # the reference has no such rule (min_words 0)
    assert quality_failure(refusal, "en", QualityParams(min_words=40)) == "too_short"
    assert quality_failure("抱歉，我无法完成这个请求。", "zh", QualityParams(min_words=40)) == "too_short"
    assert quality_failure(" ".join(["word"] * 39) + " end.", "en", QualityParams(min_words=40, check_repetition=False)) is None
