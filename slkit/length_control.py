"""Final stage: length-controlled queries (METHOD.md, "Final stage: length control").

Long (query, response) pairs from all iterations get a length constraint that their own response
satisfies, of four kinds drawn 40% about / 25% range / 10% above / 25% below, and the query is
rewritten to carry it: by templates (varied phrasing and placement, en and zh, Chinese numerals
sometimes) or by the model, whose rewrite is kept only if it shows the number and keeps the query.
"True" means inside LonGen's accepted interval for that kind (evaluation.accepted_interval), so the
Chinese "more/less than" bounds cannot be swapped without a test failing.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from slkit.evaluation import accepted_interval
from slkit.queries import shingles


@dataclass(frozen=True)
class Constraint:
    kind: str
    low: int | None  # about: the target N; range: A; above: A; below: None
    high: int | None  # range: B; below: B; else None

    def interval(self) -> tuple[float, float]:
        """LonGen's accepted interval for this constraint."""
        return accepted_interval(self.kind, self.numbers())

    def numbers(self) -> list[int]:
        return [n for n in (self.low, self.high) if n is not None]


def satisfies(constraint: Constraint, words: int) -> bool:
    a, b = constraint.interval()
    return a <= words <= b


def assign_constraint(words: int, rng: random.Random, unit: int, low: int, high: int,
                      proportions: dict[str, float], coarse_prob: float = 0.25) -> Constraint:
    """A constraint of a kind drawn by `proportions` that a response of `words` words satisfies.

    about N: N the nearest multiple of `unit` (of 2 x unit with probability coarse_prob) whose
    +-20% band holds the response; range [A, B]: the multiples of `unit` around it; above A: the
    multiple below; below B: the multiple above; all clamped to [low, high].
    """
    kind = rng.choices(list(proportions), weights=list(proportions.values()))[0]
    floor_ = max(low, min(high, math.floor(words / unit) * unit))
    ceil_ = max(low, min(high, math.ceil(words / unit) * unit))
    if kind == "about":
        step = 2 * unit if rng.random() < coarse_prob else unit
        candidates = sorted({max(low, min(high, round(words / s) * s + d)) for s in (step, unit) for d in (-s, 0, s)},
                            key=lambda n: (abs(n - words), n))
        for n in candidates:
            if satisfies(Constraint("about", n, None), words):
                return Constraint("about", n, None)
        kind = "range"  # no round number within 20%: say it as a range instead
    if kind == "range":
        if ceil_ > floor_:
            return Constraint("range", floor_, ceil_)
        # a round length: the range reaches one unit further, on the side that stays in [low, high]
        return Constraint("range", floor_, floor_ + unit) if floor_ + unit <= high else Constraint("range", floor_ - unit, floor_)
    if kind == "above":
        return Constraint("above", floor_, None)
    return Constraint("below", None, ceil_)


_DIGITS = "零一二三四五六七八九"


def chinese_numeral(n: int) -> str:
    """1 <= n <= 99,999 in Chinese numerals (2000 -> 两千, 3500 -> 三千五百, 12000 -> 一万两千)."""
    if not 0 < n < 100000:
        raise ValueError(f"{n} is outside 1..99999")
    parts, zero = [], False
    for value, unit in ((10000, "万"), (1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // value % 10
        if digit == 0:
            zero = bool(parts)
            continue
        if zero:
            parts.append("零")
            zero = False
        word = "两" if digit == 2 and unit in ("万", "千", "百") else _DIGITS[digit]
        parts.append(word + unit)
    return "".join(parts)


TEMPLATES = {
    "en": {
        "about": ["Write about {a} words.", "The answer should be around {a} words long.", "Aim for roughly {a} words.",
                  "Keep it to approximately {a} words."],
        "range": ["The length should be between {a} and {b} words.", "Write {a} to {b} words.",
                  "Use somewhere from {a} to {b} words."],
        "above": ["Write more than {a} words.", "The answer must exceed {a} words.", "Make it longer than {a} words."],
        "below": ["Keep it under {b} words.", "Write less than {b} words.", "The answer must stay below {b} words."],
    },
    "zh": {
        "about": ["字数约{a}字。", "请将篇幅控制在{a}字左右。", "全文大约{a}字。"],
        "range": ["字数在{a}到{b}字之间。", "篇幅控制在{a}至{b}字。", "请写{a}至{b}字。"],
        "above": ["字数要多于{a}字。", "全文不少于{a}字。", "篇幅需超过{a}字。"],
        "below": ["字数少于{b}字。", "全文不超过{b}字。", "篇幅请控制在{b}字以内。"],
    },
}


def constraint_phrase(constraint: Constraint, language: str, rng: random.Random, numeral_prob: float = 0.3) -> str:
    """One phrasing of the constraint; Chinese numbers are sometimes written in Chinese numerals."""
    def show(n: int | None) -> str:
        if n is None:
            return ""
        if language == "zh" and rng.random() < numeral_prob:
            return chinese_numeral(n)
        return f"{n:,}" if language == "en" and n >= 1000 and rng.random() < 0.5 else str(n)

    template = rng.choice(TEMPLATES[language][constraint.kind])
    return template.format(a=show(constraint.low), b=show(constraint.high))


def template_rewrite(query: str, constraint: Constraint, language: str, rng: random.Random) -> str:
    """The query with the constraint phrase before or after it."""
    phrase = constraint_phrase(constraint, language, rng)
    sep = "" if language == "zh" else " "
    if rng.random() < 0.3:
        return phrase + sep + query
    end = "" if query.rstrip()[-1:] in ".!?。！？" else ("。" if language == "zh" else ".")
    return query.rstrip() + end + sep + phrase


REWRITE_PROMPT = {
    "en": ("Rewrite the request below so that it also asks for this length: {phrase} Keep every other part of the "
           "request unchanged. Output only the rewritten request.\n\nRequest: {query}"),
    "zh": "改写下面的请求，使它同时提出这个篇幅要求：{phrase}请求的其他部分保持不变。只输出改写后的请求。\n\n请求：{query}",
}


def rewrite_prompt(query: str, constraint: Constraint, language: str, rng: random.Random) -> str:
    return REWRITE_PROMPT[language].format(phrase=constraint_phrase(constraint, language, rng, numeral_prob=0.0),
                                           query=query)


def mentions_number(text: str, n: int) -> bool:
    return str(n) in text.replace(",", "") or chinese_numeral(n) in text


def rewrite_failure(original: str, rewritten: str, constraint: Constraint, keep_share: float = 0.8) -> str | None:
    """Why a model rewrite is refused ('number', 'query'), or None when it is usable."""
    if not all(mentions_number(rewritten, n) for n in constraint.numbers()):
        return "number"
    grams = shingles(original)
    if len(grams & shingles(rewritten)) < keep_share * len(grams):
        return "query"
    return None
