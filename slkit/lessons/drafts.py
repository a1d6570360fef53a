"""The drafts lesson (notebooks/01_drafts.ipynb): the Generator answers, the quality check keeps or retries."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.lessons import counts_table, quality_table, steps
from slkit.models.chat import render_user_turn
from slkit.models.loading import load_tokenizer


def pick(records: list[dict]) -> dict | None:
    """The draft the lesson follows: the one that took the most tries (it shows the retries), first by id."""
    return min(records, key=lambda r: (-r["tries"], r["id"])) if records else None


def rendered_prompt(params: Params, query: str) -> str:
    """The text the model continued: the query in the model's chat template (or the plain format)."""
    return render_user_turn(load_tokenizer(params.model), query, params.model.prompt_format)


def walkthrough(out: Path, params: Params) -> None:
    """One draft of this run: the rendered prompt, the draft, the quality check check by check, the tries."""
    record = pick(read_jsonl(out / "drafts.jsonl"))
    if record is None:
        display(Markdown("No draft passed the quality check in this run: see the rejections under *What to look for*."))
        return
    display(steps([
        (f"Record `{record['id']}` of drafts.jsonl: sample {record['sample']} of query `{record['query_id']}` "
         f"({record['language']}), accepted at try {record['tries']} of at most {params.drafts.max_tries}", None),
        ("1. The prompt the Generator saw (rendered)", rendered_prompt(params, record["query"])),
        ("2. The draft", record["draft"]),
        ("3. The quality check, check by check:", None),
    ]))
    display(quality_table(record["draft"], record["language"], params.quality))


def rejections(summary: dict) -> pd.DataFrame:
    """Accepted drafts and each quality failure (tries that were sampled again)."""
    return counts_table({"accepted": summary["drafts"], **summary.get("rejected", {})})


def lengths(out: Path) -> pd.DataFrame:
    """Words of the drafts per language."""
    drafts = pd.DataFrame(read_jsonl(out / "drafts.jsonl"), columns=["language", "words", "tries"])
    return drafts.groupby("language").agg(drafts=("words", "size"), words_mean=("words", "mean"),
                                          words_min=("words", "min"), words_max=("words", "max"),
                                          tries_mean=("tries", "mean")).round(1)
