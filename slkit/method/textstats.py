"""Text statistics shared by every stage and benchmark: the word counters, language, n-grams.

Word counting follows docs/method.md: each CJK character or CJK/full-width punctuation mark
(U+4E00-9FFF, U+3000-303F, U+FF00-FFEF) is one word; the rest is split on whitespace (count_words,
for every stage of the method and LonGen). LongBench-Write is scored with LongWriter's own counter
(count_words_longwriter): Han characters plus English words, no punctuation.
"""
from __future__ import annotations

import re
from collections import Counter

CJK_CLASS = "\u4e00-\u9fff\u3000-\u303f\uff00-\uffef"
_CJK_CHAR = re.compile(f"[{CJK_CLASS}]")
_HAN = re.compile("[\u4e00-\u9fff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
# LongWriter's English word, as its scorer writes it: \b makes a Han character a word character, so
# "Python" inside Chinese text ("用Python写") or letters joined to digits ("mp3") are not words there.
_LONGWRITER_WORD = re.compile(r"\b[a-zA-Z]+\b")
# Chinese n-gram units for the repetition check, as the reference splits them: every non-ASCII character
# is a unit (Han characters, CJK punctuation, curly quotes, ellipses), and a run of ASCII characters
# (letters, digits, spaces, line breaks, ASCII punctuation) is one unit.
_ZH_UNIT = re.compile(r"[\x00-\x7f]+|[^\x00-\x7f]")


def count_words(text: str) -> int:
    """Words in `text` by the single counter used everywhere in slkit."""
    cjk = len(_CJK_CHAR.findall(text))
    rest = _CJK_CHAR.sub(" ", text)
    return cjk + len(rest.split())


def count_words_longwriter(text: str) -> int:
    """Words by LongWriter's LongBench-Write scorer: Han characters (U+4E00-9FFF) plus English words."""
    return len(_HAN.findall(text)) + len(_LONGWRITER_WORD.findall(text))


def detect_language(text: str) -> str:
    """'zh' when Han characters outnumber Latin words, else 'en' (decided per query)."""
    return "zh" if len(_HAN.findall(text)) > len(_LATIN_WORD.findall(text)) else "en"


def ngram_units(text: str, language: str) -> list[str]:
    """Units over which repetition is measured: non-ASCII characters and ASCII runs (zh), whitespace words (en)."""
    return _ZH_UNIT.findall(text) if language == "zh" else text.split()


def first_repeated_ngram(units: list[str], n: int) -> tuple[str, ...] | None:
    """The first n-gram that occurs twice, or None."""
    seen: set[tuple[str, ...]] = set()
    for i in range(len(units) - n + 1):
        gram = tuple(units[i:i + n])
        if gram in seen:
            return gram
        seen.add(gram)
    return None


def distinct_n(texts: list[str], n: int, language: str = "en") -> float:
    """Share of distinct n-grams among all n-grams of `texts` (1.0 = no repetition)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        units = ngram_units(text, language)
        counts.update(tuple(units[i:i + n]) for i in range(len(units) - n + 1))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0
