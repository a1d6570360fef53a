from slkit.params import QualityParams
from slkit.quality import ends_cleanly, quality_failure


def test_clean_endings():
    for text in ["Done.", "Really?", "Wow!", 'He said "yes."', "(see above)", "完成了。", "真的吗？", "他说：“好。”",
                 "code:\n```python\nx = 1\n```", "end.  \n"]:
        assert ends_cleanly(text), text
    for text in ["and then the", "结束了但是", "list:", "a, b,", ""]:
        assert not ends_cleanly(text), text


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


def test_meta_talk_only_in_english_edges():
    text = "Here is the revised essay.\nBody line one.\nBody two.\nBody three.\nBody four.\nBody five.\nThe end."
    assert quality_failure(text, "en") == "meta-talk"
    middle = "Start.\nLine.\nThis version of events is odd.\nMore.\nMore again.\nStill more.\nEnd here."
    assert quality_failure(middle, "en") is None
    assert quality_failure("这是修改后的版本 revised。", "zh") is None


def test_rules_can_be_relaxed():
    assert quality_failure("no ending", "en") == "unfinished"
    assert quality_failure("no ending", "en", QualityParams(check_ending=False)) is None
    assert quality_failure("   ", "en") == "empty"
