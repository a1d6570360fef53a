"""The quality check every generated text must pass (METHOD.md, "Quality check on every text")."""
from __future__ import annotations

from slkit.method.textstats import count_words, first_repeated_ngram, ngram_units
from slkit.running.params import QualityParams

# Sentence ends, closing quotes and brackets, CJK full stops and closers, an ellipsis (the Chinese
# reference accepts a final "…" or "……"); a code fence is checked apart.
CLOSING_CHARS = ".!?\"')]}" + "\u201d\u2019\u2026" + "\u3002\uff01\uff1f\u300d\u300f\u300b\u3011\uff09"
def ends_cleanly(text: str) -> bool:
    """The last visible character closes a sentence, a quote, a bracket or a code fence, or is an ellipsis."""
    stripped = text.rstrip()
    return bool(stripped) and (stripped[-1] in CLOSING_CHARS or stripped.endswith("```"))


def has_meta_talk(text: str, language: str, rules: QualityParams) -> bool:
    """A meta word in the first `meta_head_lines` or last `meta_tail_lines` non-empty lines."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    edge = lines[:rules.meta_head_lines] + lines[max(0, len(lines) - rules.meta_tail_lines):]
    return any(word in line for line in edge for word in rules.meta_words.get(language, ()))


def quality_failure(text: str, language: str, rules: QualityParams = QualityParams()) -> str | None:
    """Why `text` fails the check ('empty', 'too_short', 'unfinished', 'repetition', 'meta-talk'), or None."""
    if not text.strip():
        return "empty"
    if count_words(text) < rules.min_words:
        return "too_short"
    if rules.check_ending and not ends_cleanly(text):
        return "unfinished"
    if rules.check_repetition:
        n = rules.ngram_zh if language == "zh" else rules.ngram_en
        if first_repeated_ngram(ngram_units(text, language), n) is not None:
            return "repetition"
    if rules.check_meta_talk and has_meta_talk(text, language, rules):
        return "meta-talk"
    return None
