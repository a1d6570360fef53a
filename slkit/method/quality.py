"""The quality check every generated text must pass (docs/method.md, "The quality check")."""
from __future__ import annotations

from slkit.core.params import QualityParams, SamplingParams
from slkit.engines.base import cut_at_stop, trim_unfinished
from slkit.method.textstats import count_words, first_repeated_ngram, ngram_units


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


def quality_failure(text: str, language: str, rules: QualityParams = QualityParams(),
                    stopped_early: bool = False) -> str | None:
    """Why `text` fails the check ('empty', 'too_short', 'unfinished', 'repetition', 'meta-talk'), or None.
    A text its RepetitionWatch `stopped_early` fails for repetition: it was cut where the repeat settled, so the
    checks before it (length, ending) would judge the cut, not the text."""
    if not text.strip():
        return "empty"
    if stopped_early:
        return "repetition"
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
    micro-iteration joins them (slkit.method.extensions), whose n-gram units, but the last, are those the final text
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
        # joined as slkit.method.extensions.phase2_text joins a kept head and its continuation
        units = ngram_units("\n\n".join(p for p in (self.head, settled) if p), self.language)[:-1]
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
