from slkit.method.textstats import count_words, detect_language, distinct_n, first_repeated_ngram, ngram_units


def test_count_words_english_splits_on_whitespace():
    assert count_words("The quick  brown fox\njumps.") == 5
    assert count_words("") == 0


def test_count_words_chinese_counts_each_character_and_cjk_punctuation():
    # 8 Han characters + "，" (U+FF0C) + "。" (U+3002)
    assert count_words("今天天气很好，我们。") == 10
    assert count_words("你好") == 2


def test_count_words_mixed_text():
    # "我用" (2) + "Python" (1) + "写了" (2) + "3" (1) + "个脚本" (3) + "。" (1)
    assert count_words("我用Python写了3个脚本。") == 10
    # full-width letters (U+FF00-FFEF) count one each
    assert count_words("ＡＢ test") == 3


def test_detect_language():
    assert detect_language("请写一篇关于AI的文章") == "zh"
    assert detect_language("Write an essay about 中国 history and culture") == "en"


def test_ngram_units_and_repeats():
    assert ngram_units("我爱AI模型123", "zh") == ["我", "爱", "AI", "模", "型", "123"]
    assert first_repeated_ngram(list("abcab"), 2) == ("a", "b")
    assert first_repeated_ngram(list("abcd"), 2) is None


def test_distinct_n():
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["a b a b"], 2) == 2 / 3
