"""The length-control lesson (notebooks/05_length_control.ipynb): one long answer gets a true length constraint,
its query is rewritten to carry it, and the pair becomes a training example."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from IPython.display import Markdown

from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.lessons import steps
from slkit.method.length_control import Constraint


def describe(constraint: dict) -> str:
    c = Constraint(constraint["kind"], constraint["low"], constraint["high"])
    a, b = c.interval()
    return f"{c.kind} {'/'.join(str(n) for n in c.numbers())} (accepted interval [{a:g}, {b:g}])"


def pick(records: list[dict]) -> dict | None:
    """The pair the lesson follows: the first rewritten by the model, else the first, in id order."""
    ordered = sorted(records, key=lambda r: r["id"])
    return next((r for r in ordered if r["rewrite"] == "model"), ordered[0] if ordered else None)


def walkthrough(out: Path) -> Markdown:
    """One pair of this run: its source and words, the drawn constraint, the rewrite, the training example."""
    records = read_jsonl(out / "constrained.jsonl")
    record = pick(records)
    if record is None:
        return Markdown("No response of this run lies in the length-control window: no pair to show.")
    example = {e["id"]: e for e in read_jsonl(out / "generator_sft.jsonl")}[record["id"]]
    fallback = f" (fallback {record['fallback']})" if record["fallback"] else ""
    return steps([
        (f"Record `{record['id']}` of constrained.jsonl, from {record['source']}.jsonl ({record['language']})", None),
        ("1. The original query", record["original_query"]),
        (f"2. Its answer has {record['words']} words; the constraint drawn: {describe(record['constraint'])}"
         f"{fallback}", None),
        (f"3. The query rewritten by {record['rewrite']}", record["query"]),
        ("4. The training example: prompt", example["prompt"]),
        ("5. The training example: completion (the answer, unchanged)", example["completion"]),
    ])


def kinds_table(summary: dict, params: Params) -> pd.DataFrame:
    """Constraint kinds of the pairs against the proportions they were drawn with."""
    kinds = summary.get("kinds", {})
    total = max(1, sum(kinds.values()))
    return pd.DataFrame([{"kind": k, "pairs": kinds.get(k, 0), "share": round(kinds.get(k, 0) / total, 3),
                          "drawn with": p} for k, p in params.length_control.proportions.items()]).set_index("kind")


def scores_table(summary: dict) -> pd.DataFrame | str:
    """Length scores of the last iteration's Generator and of the final one, overall and per type."""
    scores = {"before": summary.get("length_before"), "after": summary.get("length_after")}
    if not all(scores.values()):
        return "no benchmark configured (evaluation.benchmark)"
    return pd.DataFrame({k: {"overall": v["overall"], **v["per_type"]} for k, v in scores.items()})
