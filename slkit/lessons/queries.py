"""The queries lesson (notebooks/00_queries.ipynb): self-instruct, the judge, the length filter, dedup."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from IPython.display import Markdown

from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.lessons import counts_table, steps
from slkit.method.prompts import SELF_INSTRUCT_TASK, judge_prompt, parse_judge, parse_self_instruct, self_instruct_list
from slkit.method.queries import shingles


def slot_language(record: dict, params: Params) -> str:
    """The language a query's slot asked for (slot s asks for languages[s % L]); the record's own `language`
    is the one it was written in."""
    slot = int(record["id"].rsplit("-q", 1)[1])
    return params.queries.languages[slot % len(params.queries.languages)]


def similarity(a: str, b: str) -> float:
    """The character 5-gram Jaccard similarity the near-duplicate filter uses."""
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y) if x | y else 0.0


def pick(records: list[dict]) -> dict | None:
    """The query the lesson follows: the first in id order that the judge saw, else the first."""
    ordered = sorted(records, key=lambda r: r["id"])
    return next((r for r in ordered if r.get("judge_answer") is not None), ordered[0] if ordered else None)


def walkthrough(out: Path, params: Params) -> Markdown:
    """One query of this run from its prompt to its record: the self-instruct prompt with its exemplars, the
    completion, the parsed query, the length filter, the near-duplicate check, the judge's prompt and verdict."""
    records = read_jsonl(out / "queries.jsonl")
    record = pick(records)
    if record is None:
        return Markdown("No query was accepted in this run: see the rejections under *What to look for*.")
    q = params.queries
    language = slot_language(record, params)
    others = [r["query"] for r in records if r["id"] != record["id"]] + record.get("exemplars", [])
    closest = max((similarity(record["query"], o) for o in others), default=0.0)
    shown = [(f"Record `{record['id']}` of queries.jsonl, accepted at try {record['tries']} "
              f"(slot language {language}, written in {record['language']})", None)]
    if record.get("exemplars"):
        shown.append(("1. The self-instruct turn: the request, then the answer pre-filled with the examples (a "
                      "model without a chat template completes the plain form, the same list under a header)",
                      SELF_INSTRUCT_TASK[language] + "\n\n[answer pre-filled with:]\n\n"
                      + self_instruct_list(record["exemplars"], language)))
        shown.append(("2. What the model wrote", record["completion"]))
        parsed = parse_self_instruct(record["completion"], language)
        shown.append(("3. The parsed query (the completion up to the next numbered label)", parsed))
    else:
        shown.append(("The query (this record predates the recorded prompts)", record["query"]))
    shown.append((f"4. Length filter: {record['words']} words, inside [{q.min_words}, {q.max_words}]: kept", None))
    shown.append((f"5. Near-duplicate check: highest similarity to the exemplars shown and this run's other "
                  f"queries {closest:.2f}, below {q.dedup_similarity}: kept", None))
    if record.get("judge_answer") is not None:
        shown.append(("6. The judge's prompt (zero-shot; a model without a chat template gets few-shot examples)",
                      judge_prompt(record["query"], language)))
        verdict = {True: "yes: kept", False: "no", None: "unclear"}[parse_judge(record["judge_answer"], language)]
        shown.append((f"7. The judge's answer, read as {verdict}", record["judge_answer"]))
    else:
        shown.append(("6. Judge: off in this run (queries.judge), every candidate that passed the filters is kept",
                      None))
    return steps(shown)


def rejections(summary: dict) -> pd.DataFrame:
    """Accepted queries and each rejection reason, with its share of the candidates."""
    counts = {"accepted": summary["queries"], **summary.get("rejected", {})}
    table = counts_table(counts)
    candidates = sum(n for reason, n in counts.items() if reason != "gave_up")
    # gave_up counts slots that ran out of tries, not candidates: it has no share.
    table["share of candidates"] = [None if reason == "gave_up" else round(n / max(1, candidates), 3)
                                    for reason, n in table["count"].items()]
    return table


def queries_table(out: Path) -> pd.DataFrame:
    records = read_jsonl(out / "queries.jsonl")
    return pd.DataFrame(records, columns=["id", "language", "words", "tries", "query"]).sort_values("id")
