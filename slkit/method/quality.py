"""The quality check every generated text must pass (METHOD.md, "Quality check on every text")."""
from __future__ import annotations

from slkit.engines.base import cut_at_stop, trim_unfinished
from slkit.method.textstats import count_words, first_repeated_ngram, join_paragraphs, ngram_units
from slkit.running.params import QualityParams, SamplingParams

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


def settled_text(raw: str, sampling: SamplingParams) -> str:
    """A prefix of the text the engines will make of `raw` (slkit.engines.base.postprocess) however the
    generation goes on: what raw holds before its last line break (the last line may still change, and a stop
    string may be starting), with its unfinished sentence trimmed when sampling.trim_unfinished. A code fence
    that ends it is left out: a fence ends a text only where nothing follows it."""
    text = cut_at_stop(raw, sampling.stop)
    text = text[:text.rfind("\n")] if "\n" in text else ""
    while True:
        if sampling.trim_unfinished:
            text = trim_unfinished(text)
        if not text.rstrip().endswith("```"):
            return text.strip()
        text = text.rstrip()
        text = text[:text.rfind("\n")] if "\n" in text else ""


class RepetitionWatch:
    """A request's stop_early check (slkit.engines.base.Request): True once the text generated so far holds a
    repeated n-gram that the quality check will find in the final text, so generating on is wasted. The text
    checked is `head` plus what the engines will make of the generation (settled_text) joined as an extension
    round joins them (slkit.method.extensions), whose n-gram units, but the last, are those the final text
    starts with: the verdict is the check's own. The units seen so far are kept, so each call reads only the
    new ones."""

    def __init__(self, language: str, rules: QualityParams, sampling: SamplingParams, head: str = "",
                 prefill: str = ""):
        self.language, self.sampling, self.head, self.prefill = language, sampling, head, prefill
        self.n = rules.ngram_zh if language == "zh" else rules.ngram_en
        self.seen: set[tuple[str, ...]] = set()
        self.units: list[str] = []  # the settled units so far, less the last

    def __call__(self, text: str) -> bool:
        settled = settled_text(text[len(self.prefill):], self.sampling)
        if not settled:
            return False
        units = ngram_units(join_paragraphs([p for p in (self.head, settled) if p]), self.language)[:-1]
        for i in range(max(0, len(self.units) - self.n + 1), len(units) - self.n + 1):  # the new n-grams
            gram = tuple(units[i:i + self.n])
            if gram in self.seen:
                return True
            self.seen.add(gram)
        self.units = units
        return False


def repetition_watch(language: str, rules: QualityParams, sampling: SamplingParams, head: str = "",
                     prefill: str = "") -> RepetitionWatch | None:
    """The stop_early check of a text the quality check will judge, or None when it checks no repetition."""
    return RepetitionWatch(language, rules, sampling, head, prefill) if rules.check_repetition else None
