"""The quality check every generated text must pass (docs/method.md, "The quality check")."""
from __future__ import annotations

from slkit.method.textstats import count_words, first_repeated_ngram, ngram_units
from slkit.running.params import QualityParams


def ends_cleanly(text: str, language: str, rules: QualityParams = QualityParams()) -> bool:
    """The last visible character is one of the language's `ending_chars` (a code fence ends in a backtick)."""
    stripped = text.rstrip()
    return bool(stripped) and stripped[-1] in rules.ending_chars.get(language, "")


def meta_window(text: str, rules: QualityParams) -> list[str]:
    """The lines searched for meta-talk: the first `meta_head_lines` and the last `meta_tail_lines` lines of the
    text, blank lines counted as lines, as the reference counts them (so "# Title", a blank line, then the body
    puts only the title in a head of 2)."""
    lines = text.strip().split("\n")
    return lines[:rules.meta_head_lines] + lines[max(0, len(lines) - rules.meta_tail_lines):]


def meta_talk_words(text: str, language: str, rules: QualityParams) -> list[str]:
    """The meta words (matched case-sensitively) found in the text's meta window."""
    window = "\n".join(meta_window(text, rules))
    return [word for word in rules.meta_words.get(language, ()) if word in window]


def quality_failure(text: str, language: str, rules: QualityParams = QualityParams()) -> str | None:
    """Why `text` fails the check ('empty', 'too_short', 'unfinished', 'repetition', 'meta-talk'), or None."""
    if not text.strip():
        return "empty"
    if count_words(text) < rules.min_words:
        return "too_short"
    if rules.check_ending and not ends_cleanly(text, language, rules):
        return "unfinished"
    if rules.check_repetition:
        n = rules.ngram_zh if language == "zh" else rules.ngram_en
        if first_repeated_ngram(ngram_units(text, language), n) is not None:
            return "repetition"
    if rules.check_meta_talk and meta_talk_words(text, language, rules):
        return "meta-talk"
    return None
