"""Steps 3 and 4: length-biased resampling (of the drafts and of the extensions) and the Generator /
Extender training sets.

Training records are {"id", "prompt", "completion"} with the prompt as an unrendered user
message; training renders it exactly as generation does.
"""
from __future__ import annotations

import random

from slkit.core.schema import TrainingExample
from slkit.method.prompts import extension_prompt


def resample_by_length(items: list[dict], rng: random.Random, coefficient: float = 2.0,
                       exponent: float = 3.0, key: str = "words", group: str | None = None) -> list[dict]:
    """Keep item i of rank k (0 = shortest) when U(0,1) > coefficient * r**exponent, r = 1 - k/N.

    With the reference values about 60% survive and the shortest ~20% always go. With `group`
    (e.g. "language") items are ranked among those of their group only: the reference runs each
    language apart, and a Chinese text counts more words than the same text in English. Ties in
    length keep their input order; the survivors keep their input order.
    """
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item[group] if group else None, []).append(i)
    r = {}
    for members in groups.values():
        for rank, i in enumerate(sorted(members, key=lambda i: items[i][key])):
            r[i] = 1 - rank / len(members)
    return [item for i, item in enumerate(items) if rng.random() > coefficient * r[i] ** exponent]


def drop_lines(text: str, keep_prob: float, rng: random.Random) -> str:
    """Each non-empty line kept with probability keep_prob (blank lines kept as structure); never empty."""
    lines = text.split("\n")
    kept = [line for line in lines if not line.strip() or rng.random() < keep_prob]
    if not any(line.strip() for line in kept):
        kept = [next(line for line in lines if line.strip())]
    return "\n".join(kept)


def generator_examples(items: list[dict]) -> list[dict]:
    """query -> extended text."""
    return [TrainingExample(id=it["id"], prompt=it["query"], completion=it["extended"]).model_dump() for it in items]


def extender_examples(items: list[dict], keep_prob: float, rng: random.Random) -> list[dict]:
    """The extension template over (query, draft with ~20% of lines dropped) -> extended text: the prompt
    the Extender gets in both stages of the extension."""
    return [TrainingExample(
        id=it["id"], prompt=extension_prompt(it["query"], drop_lines(it["draft"], keep_prob, rng), it["language"]),
        completion=it["extended"]).model_dump() for it in items]
