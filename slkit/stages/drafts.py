"""The drafts stage: the Generator answers every query; drafts that pass the quality check -> drafts.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from slkit.core.layout import iter_dir
from slkit.core.params import Params
from slkit.core.records import mark_done, read_records
from slkit.core.schema import DraftsSummary, QueryRecord
from slkit.engines.base import CapTally
from slkit.method.drafts import write_drafts
from slkit.stages.common import generate_records, skip_when_done


@skip_when_done("drafts")
def drafts_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """queries.jsonl -> drafts.jsonl: Generator drafts that pass the quality check."""
    out = iter_dir(run_dir, iteration)
    queries = read_records(out / "queries.jsonl", QueryRecord)
    caps = CapTally()
    records, rejected = generate_records(
        params, run_dir, iteration, "drafts", out / "drafts.jsonl", len(queries) * params.drafts.samples_per_query,
        lambda engine, writer, on_done: write_drafts(engine, queries, params, iteration, writer, params.quality, on_done),
        caps=caps)
    summary = DraftsSummary(drafts=len(records), rejected=dict(rejected), finish_share=params.drafts.finish_share,
                            capped=caps.summary()).model_dump()
    mark_done(out, "drafts", summary)
    return summary
