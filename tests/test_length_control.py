import random
import re
from collections import Counter

import pytest

from slkit.method.length_control import (Constraint, assign_constraint, chinese_numeral, constraint_phrase, mentions_number, names_length, rewrite_failure, satisfies, template_rewrite)
from slkit.core.params import ParamsError, params_from_dict

PROPORTIONS = {"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}
KINDS = tuple(PROPORTIONS)
# (low, high, unit): the demo's window and the method's.
WINDOWS = [(100, 1000, 100), (2000, 8000, 1000)]


def longen_accepts(kind: str, low: int | None, high: int | None, words: int) -> bool:
    """LonGen's accepted interval, written out here (not through slkit) so the tests check the stage's rule."""
    if kind == "about":
        return 0.8 * low <= words <= 1.2 * low
    if kind == "range":
        return low <= words <= high
    if kind == "above":  # "more than A": not said of exactly A words
        return low < words <= 1.5 * low
    return 0.5 * high <= words < high  # below: "less than B"


def true_constraints(kind: str, words: int, step: int, low: int, high: int) -> list[tuple]:
    """Every constraint of `kind` in multiples of `step` inside [low, high] that is true of `words`, by brute force."""
    multiples = range(step * -(-low // step), high + 1, step)
    if kind == "range":
        found = [(a, b) for a in multiples for b in multiples if a < b]
    elif kind == "below":
        found = [(None, b) for b in multiples]
    else:
        found = [(n, None) for n in multiples]
    return [c for c in found if longen_accepts(kind, *c, words)]


@pytest.mark.parametrize("low,high,unit", WINDOWS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coarse_prob", [0.0, 1.0])
def test_every_length_of_the_window_gets_a_true_constraint(low, high, unit, kind, coarse_prob):
    rng = random.Random(0)
    for words in range(low, high + 1):
        a = assign_constraint(words, rng, unit, low, high, {kind: 1.0}, coarse_prob)
        c = a.constraint
        assert longen_accepts(c.kind, c.low, c.high, words), (words, a)
        assert all(low <= n <= high and n % a.step == 0 for n in c.numbers()), (words, a)
        assert a.drawn_step == (2 * unit if coarse_prob else unit) and a.step in (unit, a.drawn_step)
        # A fallback is taken only when what was drawn has no true constraint at all.
        if c.kind != kind:
            assert c.kind == "range" and a.fallback == f"{kind}->range"
            assert not true_constraints(kind, words, unit, low, high), (words, a)
        elif a.step != a.drawn_step:
            assert a.fallback == "coarse->unit"
            assert not true_constraints(kind, words, 2 * unit, low, high), (words, a)
        else:
            assert a.fallback is None


def test_the_demo_crash_case_gets_a_true_constraint():
    # 172 words, unit 100: "more than 100" accepts only [100, 150]; no "more than" is true, so a range is said.
    a = assign_constraint(172, random.Random(0), 100, 100, 1000, {"above": 1.0}, 0.0)
    assert a.constraint == Constraint("range", 100, 200) and a.fallback == "above->range"
    assert satisfies(a.constraint, 172)


def test_exact_multiples_step_one_unit_out():
    def one(words, kind, unit=1000, low=2000, high=8000):
        return assign_constraint(words, random.Random(0), unit, low, high, {kind: 1.0}, 0.0).constraint

    assert one(3000, "above") == Constraint("above", 2000, None)  # not "more than 3000"
    assert one(3000, "below") == Constraint("below", None, 4000)  # not "less than 3000"
    assert one(400, "below", 100, 100, 1000) == Constraint("below", None, 500)
    assert one(400, "above", 100, 100, 1000) == Constraint("above", 300, None)
    assert one(8000, "below") == Constraint("range", 7000, 8000)  # "less than 9000" leaves the window
    assert one(2000, "above") == Constraint("range", 2000, 3000)  # "more than 1000" too


def test_bounds_by_kind():
    rng = random.Random(1)

    def one(words, kind):
        return assign_constraint(words, rng, 1000, 2000, 8000, {kind: 1.0}, 0.0).constraint

    assert one(3400, "range") == Constraint("range", 3000, 4000)
    assert one(3400, "above") == Constraint("above", 3000, None)
    assert one(3400, "below") == Constraint("below", None, 4000)
    assert one(3400, "about") == Constraint("about", 3000, None)
    assert one(8000, "range") == Constraint("range", 7000, 8000)


def test_kind_proportions_follow_the_method():
    rng = random.Random(2)
    kinds = Counter(assign_constraint(rng.randint(2000, 8000), rng, 1000, 2000, 8000, PROPORTIONS, 0.2).constraint.kind
                    for _ in range(20000))
    assert kinds["range"] / 20000 == pytest.approx(0.25, abs=0.03)  # plus the rare fallbacks
    for kind in ("about", "above", "below"):
        assert kinds[kind] / 20000 == pytest.approx(PROPORTIONS[kind], abs=0.02)


@pytest.mark.parametrize("low,high,unit", WINDOWS)
def test_coarse_prob_changes_the_constraints(low, high, unit):
    def constraints(coarse_prob):
        rng = random.Random(5)
        return [assign_constraint(w, rng, unit, low, high, PROPORTIONS, coarse_prob) for w in range(low, high + 1)]

    fine, coarse = constraints(0.0), constraints(1.0)
    assert all(n % unit == 0 for a in fine for n in a.constraint.numbers())
    assert not [a for a in fine if a.step != unit]
    coarse_ones = [a for a in coarse if a.step == 2 * unit]
    assert all(n % (2 * unit) == 0 for a in coarse_ones for n in a.constraint.numbers())
    assert len(coarse_ones) > 0.5 * len(coarse)  # unit only where no coarse constraint is true
    for kind in KINDS:  # every kind, not only "about"
        fine_kind = Counter(a.constraint for a in fine if a.constraint.kind == kind)
        coarse_kind = Counter(a.constraint for a in coarse if a.constraint.kind == kind)
        assert fine_kind != coarse_kind, kind
        assert any(a.constraint.kind == kind for a in coarse_ones), kind
    rng = random.Random(6)
    drawn = [assign_constraint(rng.randint(low, high), rng, unit, low, high, PROPORTIONS, 0.2).drawn_step
             for _ in range(5000)]
    assert drawn.count(2 * unit) / 5000 == pytest.approx(0.2, abs=0.02)


def test_lengths_outside_the_window_and_windows_without_a_range_are_refused():
    with pytest.raises(ValueError, match=r"outside the length-control window \[2000, 8000\]"):
        assign_constraint(1999, random.Random(0), 1000, 2000, 8000, PROPORTIONS)
    base = {"run_name": "x", "model": {"path": "builtin:tiny-random-llama"}}
    for window in ({"min_words": 150, "max_words": 1000, "round_to": 100},
                   {"min_words": 2000, "max_words": 2000, "round_to": 1000}):
        with pytest.raises(ParamsError, match=r"length_control: .*must be multiples of round_to.*one round_to apart"):
            params_from_dict({**base, "length_control": window})


def test_chinese_numerals():
    assert [chinese_numeral(n) for n in (2000, 3500, 8000, 12000, 2050)] == ["两千", "三千五百", "八千", "一万两千", "两千零五十"]


# Bound words and the direction they give a number. A search finds the leftmost, so 不少于 / 不超过 are
# read whole, never as 少于 / 超过 inside them (the reference's swapped bounds would fail here).
BOUND_WORDS = {"more than": "lower", "exceed": "lower", "longer than": "lower", "under": "upper",
               "less than": "upper", "below": "upper", "不少于": "lower", "不超过": "upper", "多于": "lower",
               "少于": "upper", "大于": "lower", "小于": "upper", "超过": "lower", "以内": "upper"}
_BOUND = re.compile("|".join(sorted(map(re.escape, BOUND_WORDS), key=len, reverse=True)))


def bound_direction(text: str) -> str | None:
    found = _BOUND.findall(text)
    assert len(found) <= 1, found
    return BOUND_WORDS[found[0]] if found else None


def test_bound_direction_reads_nested_chinese_words_whole():
    assert bound_direction("全文不超过3000字。") == "upper" and bound_direction("字数少于3000字。") == "upper"
    assert bound_direction("全文不少于3000字。") == "lower" and bound_direction("篇幅需超过3000字。") == "lower"
    assert bound_direction("字数小于三千字") == "upper"  # the reference's "more than" in Chinese
    assert bound_direction("字数约3000字。") is None


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("kind", ["about", "range", "above", "below"])
def test_template_rewrites_keep_the_query_and_say_the_right_bound(language, kind):
    rng = random.Random(3)
    query = "Write a detailed history of the printing press." if language == "en" else "请详细介绍印刷术的发展历史"
    for words in (2345, 4999, 7600) * 5:
        c = assign_constraint(words, rng, 1000, 2000, 8000, {kind: 1.0}, 0.2).constraint
        text = template_rewrite(query, c, language, rng)
        assert query.rstrip("。.") in text
        assert all(mentions_number(text, n) for n in c.numbers())
        assert rewrite_failure(query, text, c) is None
        # "less than" carries the upper bound, "more than" the lower one; about and range say neither
        assert bound_direction(text) == {"above": "lower", "below": "upper"}.get(c.kind), text


def test_chinese_numerals_appear_sometimes():
    rng = random.Random(4)
    phrases = [constraint_phrase(Constraint("about", 3000, None), "zh", rng) for _ in range(200)]
    assert any("三千" in p for p in phrases) and any("3000" in p for p in phrases)


def test_model_rewrite_check_rejects_lost_number_or_query():
    query = "Write a detailed history of the printing press and its effect on Europe."
    c = Constraint("range", 3000, 4000)
    assert rewrite_failure(query, query + " Write 3000 to 4000 words.", c) is None
    assert rewrite_failure(query, query + " Write 3000 words or so.", c) == "number"
    assert rewrite_failure(query, "Write about printing in 3,000 to 4,000 words.", c) == "query"
    assert rewrite_failure("请介绍印刷术的历史", "请介绍印刷术的历史，字数在三千到四千字之间。", c) is None


@pytest.mark.parametrize("query", [
    "Write 500 words about the sea.", "Write a 1,500-word essay on urban planning.", "Compose two thousand words on jazz.",
    "Draft a 10-page report on solar power.", "Write at least 2k words about Rome.", "Write a 3000 word story.",
    "写一篇3000字的文章，介绍长城。", "写一篇三千字的文章，介绍长城。", "请写一篇不少于五百字的散文。", "字数不少于两千，介绍丝绸之路。",
    "篇幅约3000，讲述茶的历史。", "写一篇三千五百个字的小说。"])
def test_queries_that_name_a_length_are_found(query):
    assert names_length(query)


@pytest.mark.parametrize("query", [
    "Write a detailed history of the printing press.", "Describe 3 characters of a novel in depth.",
    "Explain word by word how the poem works.", "Write about the 1990s and 20 years of change.",
    "介绍十字路口的交通设计。", "请详细介绍印刷术的发展历史", "写一篇关于数字化转型的文章。", "用一字一句描写秋天的故乡。",
    "写一篇关于汉字演变的文章，篇幅较长，分3部分。"])
def test_queries_without_a_length_are_not_flagged(query):
    assert not names_length(query)
