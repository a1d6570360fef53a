import random

import pytest

from slkit.method.prompts import extension_prompt
from slkit.method.training_sets import drop_lines, extender_examples, generator_examples, resample_by_length


def test_resampling_statistics_match_the_method():
    n = 20000
    items = [{"id": i, "words": i} for i in range(n)]  # id == length rank
    kept = resample_by_length(items, random.Random(0))
    assert len(kept) / n == pytest.approx(0.595, abs=0.015)  # 1 - integral of min(1, 2 r^3)
    # r = 1 - rank/N > 2^(-1/3) = 0.794: the shortest ~20.6% never survive
    assert min(k["words"] for k in kept) >= int(n * (1 - 0.5 ** (1 / 3)))
    longest_tenth = [k for k in kept if k["words"] >= 0.9 * n]
    assert len(longest_tenth) / (0.1 * n) == pytest.approx(1.0, abs=0.01)  # r <= 0.1 -> p(drop) <= 0.002


def test_resampling_ranks_by_words_not_input_order():
    items = [{"id": i, "words": w} for i, w in enumerate([900, 5, 800, 7, 1000, 3, 950, 2, 990, 1] * 200)]
    kept = resample_by_length(items, random.Random(3))
    # lengths 1 and 2 are the bottom 20% of ranks (r > 0.8): never kept, wherever they stand in the input
    assert not [k for k in kept if k["words"] <= 2]
    assert sum(k["words"] >= 800 for k in kept) > 3 * sum(k["words"] <= 7 for k in kept)


def test_resampling_ranks_within_each_language():
    # Chinese texts count more words (each character is one): ranked together, English texts would be
    # the shortest and mostly dropped; the reference runs each language apart
    items = [{"id": i, "language": "en", "words": 100 + i} for i in range(1000)] + \
            [{"id": 1000 + i, "language": "zh", "words": 5000 + i} for i in range(1000)]
    kept = resample_by_length(items, random.Random(0), group="language")
    for language, base in (("en", 100), ("zh", 5000)):
        words = [k["words"] - base for k in kept if k["language"] == language]
        assert len(words) / 1000 == pytest.approx(0.595, abs=0.05)
        assert min(words) >= 200  # the shortest ~20% of each language always go
    assert resample_by_length(items, random.Random(0), group="language") == kept  # reproducible by seed


def test_drop_lines_keeps_about_80_percent():
    text = "\n".join(f"line {i}" for i in range(5000))
    kept = drop_lines(text, 0.8, random.Random(0)).split("\n")
    assert len(kept) / 5000 == pytest.approx(0.8, abs=0.02)
    assert kept == [line for line in text.split("\n") if line in set(kept)]  # order preserved
    assert drop_lines("only line", 0.0001, random.Random(0)) == "only line"  # never empty


def test_training_sets():
    items = [{"id": "a", "query": "Write about tea.", "language": "en", "draft": "l1\nl2\nl3\nl4\nl5",
              "extended": "long text."}]
    gen = generator_examples(items)
    assert gen == [{"id": "a", "prompt": "Write about tea.", "completion": "long text."}]
    ext = extender_examples(items, 0.8, random.Random(0))
    assert ext[0]["completion"] == "long text." and "Write about tea." in ext[0]["prompt"]
    # the extension template, the prompt of both extension stages
    assert extender_examples(items, 1.0, random.Random(0))[0]["prompt"] == extension_prompt(
        "Write about tea.", "l1\nl2\nl3\nl4\nl5", "en")
    dropped = extender_examples(items * 200, 0.8, random.Random(1))
    assert any("l3" not in e["prompt"] for e in dropped) and any("l3" in e["prompt"] for e in dropped)
