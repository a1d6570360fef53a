"""Final stage: length-controlled queries (docs/method.md, "Final stage: length control").

Long (query, response) pairs from all iterations get a length constraint that their own response
satisfies, of four kinds drawn 40% about / 25% range / 10% above / 25% below, and the query is
rewritten to carry it: by templates (varied phrasing and placement, en and zh, Chinese numerals
sometimes) or by the model, whose rewrite is kept only if it shows the number and keeps the query.
"True" means inside LonGen's accepted interval for that kind (slkit.method.constraints), and
"more/less than N" is never said of exactly N words, so the Chinese "more/less than" bounds cannot be
swapped without a test failing. Where the reference clamps a bound into the window (which can make it
false), slkit falls back to a kind that is true (assign_constraint). A query that already names a
length (names_length) is skipped, where the reference's model rewrite would replace it: a template
cannot rewrite a limit it did not write, and a second limit would contradict the first.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from slkit.method.constraints import accepted_interval
from slkit.method.queries import shingles


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


# When the drawn kind has no true constraint at this length, unit and window, the constraint is a range:
# on a valid window (bounds multiples of the unit, at least one unit apart) the multiples of the unit
# around a length make a range true of every length in the window.
FALLBACK_KIND = "range"


def true_constraint(kind: str, words: int, step: int, low: int, high: int) -> Constraint | None:
    """The constraint of `kind` whose numbers are multiples of `step` inside [low, high] and that is
    true of a response of `words` words, or None when there is none.

    about N: the nearest N whose +-20% band holds the response (on a tie the smaller);
    range [A, B]: the multiples around the response; at an exact multiple one step further up (down at
    the top of the window); above A: the largest multiple strictly below the response, below B: the
    smallest strictly above ("more than 3000" is not said of exactly 3,000 words). These are the
    multiples nearest the response, so where they are not true no other multiple of `step` is.
    """
    floor_ = words // step * step
    ceil_ = -(-words // step) * step
    if kind == "about":
        candidates = [Constraint("about", n, None) for n in sorted({floor_, ceil_}, key=lambda n: (abs(n - words), n))]
    elif kind == "range":
        a, b = floor_, ceil_
        if a == b:
            a, b = (a, a + step) if a + step <= high else (a - step, a)
        candidates = [Constraint("range", a, b)]
    elif kind == "above":
        candidates = [Constraint("above", ceil_ - step, None)]
    elif kind == "below":
        candidates = [Constraint("below", None, floor_ + step)]
    else:
        raise ValueError(f"unknown constraint kind {kind!r}")
    return next((c for c in candidates if all(max(1, low) <= n <= high for n in c.numbers()) and satisfies(c, words)),
                None)


@dataclass(frozen=True)
class Assignment:
    """A constraint and what was drawn for it."""
    constraint: Constraint
    drawn_kind: str  # by the proportions
    drawn_step: int  # 2 x unit with probability coarse_prob, else unit
    step: int  # the constraint's numbers are multiples of this

    @property
    def fallback(self) -> str | None:
        """'<drawn>-><kind>' when the drawn kind had no true constraint, 'coarse->unit' when 2 x unit had none."""
        if self.constraint.kind != self.drawn_kind:
            return f"{self.drawn_kind}->{self.constraint.kind}"
        return "coarse->unit" if self.step != self.drawn_step else None


def assign_constraint(words: int, rng: random.Random, unit: int, low: int, high: int,
                      proportions: dict[str, float], coarse_prob: float = 0.2) -> Assignment:
    """A constraint that a response of `words` words satisfies, of a kind drawn by `proportions`, with
    numbers that are multiples of 2 x unit with probability coarse_prob (else of unit), inside [low, high].

    Fallbacks, in order, each taken only when nothing before it is true of the response: the drawn kind
    with multiples of unit (when coarse was drawn), then a range (FALLBACK_KIND) with the drawn step,
    then a range with unit. The kind is kept before the coarseness: the kind proportions are the method's.
    Raises ValueError when `words` lies outside [low, high] or the window has no range (bounds not
    multiples of unit, or less than one unit apart: params.py refuses such a window).
    """
    if not low <= words <= high:
        raise ValueError(f"{words} words lie outside the length-control window [{low}, {high}]")
    kind = rng.choices(list(proportions), weights=list(proportions.values()))[0]
    drawn_step = 2 * unit if rng.random() < coarse_prob else unit
    for candidate_kind in dict.fromkeys((kind, FALLBACK_KIND)):
        for step in dict.fromkeys((drawn_step, unit)):
            constraint = true_constraint(candidate_kind, words, step, low, high)
            if constraint:
                return Assignment(constraint, kind, drawn_step, step)
    raise ValueError(f"no constraint in multiples of {unit} inside [{low}, {high}] is true of {words} words: "
                     f"the window's bounds must be multiples of the unit, at least one unit apart")


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


# A length the query already asks for: a number of words or pages ("500 words", "a 1,500-word
# essay", "two thousand words"), or in Chinese a number of 字 ("3000字", "三千字") or a 字数/篇幅 requirement
# with a number. Chinese numerals need 百, 千 or 万, so 十字路口 or 一字一句 are not lengths.
_EN_NUMBER = r"(?:\d[\d,.]*\s*k?|(?:(?:one|two|three|four|five|six|seven|eight|nine|ten|fifteen|twenty|thirty|forty|" \
             r"fifty|a|several)[\s-]+)*(?:hundred|thousand))"
_LENGTH_NAMED = re.compile(
    rf"\b{_EN_NUMBER}[\s-]*(?:words?|pages?)\b"
    r"|[\d０-９]+\s*(?:个)?字"
    r"|[一二两三四五六七八九十][零一二两三四五六七八九十百千万]*[百千万]\s*(?:个)?字"
    r"|(?:字数|篇幅)[^。！？，,；;\n]{0,8}?[\d０-９零一二两三四五六七八九十百千万]", re.IGNORECASE)


def names_length(query: str) -> bool:
    """Whether the query already asks for a length (a second limit added to it would contradict the first)."""
    return bool(_LENGTH_NAMED.search(query))


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
