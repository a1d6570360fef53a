import random
from collections import Counter

import pytest

from slkit.length_control import (Constraint, assign_constraint, chinese_numeral, constraint_phrase, mentions_number,
                                  rewrite_failure, satisfies, template_rewrite)

PROPORTIONS = {"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}


@pytest.mark.parametrize("kind", ["about", "range", "above", "below"])
def test_every_constraint_is_true_of_its_response_and_clamped(kind):
    rng = random.Random(0)
    for words in range(2000, 8001, 13):
        c = assign_constraint(words, rng, 1000, 2000, 8000, {kind: 1.0})
        assert satisfies(c, words), (words, c)
        assert all(2000 <= n <= 8000 and n % 1000 == 0 for n in c.numbers()), c
        if kind != "about":  # 'about' falls back to a range only when no round N is within 20%
            assert c.kind == kind


def test_bounds_by_kind():
    rng = random.Random(1)
    assert assign_constraint(3400, rng, 1000, 2000, 8000, {"range": 1}) == Constraint("range", 3000, 4000)
    assert assign_constraint(3400, rng, 1000, 2000, 8000, {"above": 1}) == Constraint("above", 3000, None)
    assert assign_constraint(3400, rng, 1000, 2000, 8000, {"below": 1}) == Constraint("below", None, 4000)
    assert assign_constraint(3400, rng, 1000, 2000, 8000, {"about": 1}, coarse_prob=0).low == 3000
    assert assign_constraint(8000, rng, 1000, 2000, 8000, {"range": 1}) == Constraint("range", 7000, 8000)


def test_kind_proportions_follow_the_method():
    rng = random.Random(2)
    kinds = Counter(assign_constraint(rng.randint(2000, 8000), rng, 1000, 2000, 8000, PROPORTIONS).kind
                    for _ in range(20000))
    assert kinds["range"] / 20000 == pytest.approx(0.25, abs=0.03)  # plus the rare 'about' fallbacks
    for kind in ("about", "above", "below"):
        assert kinds[kind] / 20000 == pytest.approx(PROPORTIONS[kind], abs=0.02)


def test_chinese_numerals():
    assert [chinese_numeral(n) for n in (2000, 3500, 8000, 12000, 2050)] == ["两千", "三千五百", "八千", "一万两千", "两千零五十"]


@pytest.mark.parametrize("language", ["en", "zh"])
@pytest.mark.parametrize("kind", ["about", "range", "above", "below"])
def test_template_rewrites_keep_the_query_and_say_the_right_bound(language, kind):
    rng = random.Random(3)
    query = "Write a detailed history of the printing press." if language == "en" else "请详细介绍印刷术的发展历史"
    for words in (2345, 4999, 7600):
        c = assign_constraint(words, rng, 1000, 2000, 8000, {kind: 1.0})
        text = template_rewrite(query, c, language, rng)
        assert query.rstrip("。.") in text
        assert all(mentions_number(text, n) for n in c.numbers())
        assert rewrite_failure(query, text, c) is None
        if c.kind == "below":  # the reference swapped these in Chinese: "less than" must carry the upper bound
            assert any(w in text for w in ("under", "less", "below", "少于", "不超过", "以内"))
        if c.kind == "above":
            assert any(w in text for w in ("more", "exceed", "longer", "多于", "不少于", "超过"))


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
