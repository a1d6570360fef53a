"""The queries stage: new writing requests by self-instruct, judged, length-filtered, deduplicated -> queries.jsonl."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from slkit.core.layout import iter_dir
from slkit.core.params import Params
from slkit.core.records import mark_done
from slkit.core.schema import QueriesSummary
from slkit.engines.base import CapTally
from slkit.method.queries import synthesize_queries
from slkit.stages.common import earlier_queries, exemplar_pool, generate_records, skip_when_done


@skip_when_done("queries")
def queries_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """-> queries.jsonl: new queries by self-instruct, judged, length-filtered, deduplicated."""
    out = iter_dir(run_dir, iteration)
    earlier = earlier_queries(run_dir, iteration)
    pool = exemplar_pool(params, earlier)
    caps = CapTally()
    records, rejected = generate_records(
        params, run_dir, iteration, "queries", out / "queries.jsonl",
        params.queries.per_language * len(params.queries.languages),
        lambda engine, writer, on_done: synthesize_queries(engine, pool, [r["query"] for r in earlier], params,
                                                           iteration, writer, on_done),
        caps=caps, texts_per_item=2 if params.queries.judge else 1)  # a candidate, then the judge's answer
    summary = QueriesSummary(queries=len(records), rejected=dict(rejected), pool_size=len(pool),
                             capped=caps.summary()).model_dump()
    mark_done(out, "queries", summary)
    return summary
