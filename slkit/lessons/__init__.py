"""Lessons: what the stage notebooks show, computed here so the notebooks stay a few calls each.

    from slkit.lessons import setup, params_table
    params, out = setup(run_dir, iteration, "extensions")

Each notebook is a chapter on one step of the method, on its run's own data: the idea (the rule with this
run's numbers), this run's params, the whole stage, one real item step by step, what to look for, and what
to try. One module per stage (slkit.lessons.<stage>) holds the functions its notebook calls; this module
holds what they share: the setup, the params table, the quality check shown check by check, and text shown
as a sequence of labelled steps.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from IPython.display import Markdown
from pydantic import BaseModel

from slkit.core.layout import load_run_params, stage_dir
from slkit.core.params import Params, QualityParams
from slkit.core.registry import BY_NAME
from slkit.method.quality import ends_cleanly, meta_talk_words, quality_failure
from slkit.method.textstats import count_words, first_repeated_ngram, ngram_units

# The headings of every lesson notebook, in order (tests/test_lessons.py checks each notebook has them).
SECTIONS = ("The idea", "This run's params", "The whole stage", "One item, step by step", "What to look for",
            "Try this")


def setup(run_dir: str | Path, iteration: int, stage: str) -> tuple[Params, Path]:
    """The run's params (read here, once: the notebook passes them to its stage) and the directory `stage` writes
    in; pandas shows whole cells of text."""
    pd.set_option("display.max_colwidth", 160)
    pd.set_option("display.max_rows", 60)
    return load_run_params(run_dir), stage_dir(run_dir, iteration, stage)


def _flatten(section: BaseModel, reference: BaseModel, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for name, field in type(section).model_fields.items():
        value, default = getattr(section, name), getattr(reference, name)
        if isinstance(value, BaseModel) and isinstance(default, BaseModel):
            rows += _flatten(value, default, f"{prefix}.{name}")
        else:
            rows.append({"param": f"{prefix}.{name}", "this run": _show(value), "reference": _show(default),
                         "changed": value != default, "what it is": field.description or ""})
    return rows


def params_table(params: Params, stage: str) -> pd.DataFrame:
    """Every param of the stage's params sections (slkit.core.registry): this run's value, the default
    (the reference's value, where the method has one), whether this run changed it, and its description."""
    rows = [row for name in BY_NAME[stage].params
            for row in _flatten(getattr(params, name), type(getattr(params, name))(), name)]
    table = pd.DataFrame(rows, columns=["param", "this run", "reference", "changed", "what it is"])
    if not table["what it is"].any():  # descriptions are added to params.py field by field
        table = table.drop(columns="what it is")
    return table.set_index("param")


def _show(value: Any) -> str:
    """A param value as text: one column of mixed types (lists, dicts, floats) shows every row alike."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quality_table(text: str, language: str, rules: QualityParams) -> pd.DataFrame:
    """The quality check of slkit.method.quality, check by check, on one text: what each looked at and whether
    it passed. The last row is the verdict quality_failure gives."""
    words = count_words(text)
    n = rules.ngram_zh if language == "zh" else rules.ngram_en
    repeated = first_repeated_ngram(ngram_units(text, language), n) if rules.check_repetition else None
    meta = sorted(meta_talk_words(text, language, rules))
    stripped = text.rstrip()
    rows = [
        ("not empty", "", bool(text.strip())),
        ("long enough", f"{words} words, quality.min_words {rules.min_words}", words >= rules.min_words),
        ("ends cleanly", f"last character {stripped[-1:]!r}" + ("" if rules.check_ending else " (check off)"),
         ends_cleanly(text, language, rules) or not rules.check_ending),
        (f"no repeated {n}-gram", ("first repeated: " + " ".join(repeated)) if repeated else
         ("none" if rules.check_repetition else "check off"), repeated is None),
        ("no meta-talk at the edges", ", ".join(meta) or "none" if rules.check_meta_talk else "check off",
         not (meta and rules.check_meta_talk)),
    ]
    failure = quality_failure(text, language, rules)
    rows.append(("verdict", failure or "passes", failure is None))
    return pd.DataFrame(rows, columns=["check", "what it saw", "passed"]).set_index("check")


def _fence(text: str) -> str:
    """`text` in a fenced block that no run of backticks inside it can close."""
    ticks = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", text)])
    return f"{ticks}text\n{text}\n{ticks}"


def steps(items: Iterable[tuple[str, str | None]]) -> Markdown:
    """Labelled steps as markdown: a title, then its text in a block (a step whose text is None is a line of
    prose only)."""
    parts = []
    for title, text in items:
        parts.append(f"**{title}**" if text is None else f"**{title}** ({count_words(text)} words)\n\n{_fence(text)}")
    return Markdown("\n\n".join(parts))


def counts_table(counts: dict[str, int], name: str = "count") -> pd.DataFrame:
    """A {reason: count} mapping of a stage summary as a one-column table, largest first."""
    return pd.Series(counts, name=name, dtype=int).sort_values(ascending=False).to_frame()
