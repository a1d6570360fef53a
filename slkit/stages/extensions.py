"""The extensions stage: drafts resampled by length, then lengthened by the Extender in two phases
-> resampled_drafts.jsonl, extensions.jsonl."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from slkit.core.layout import iter_dir
from slkit.core.params import Params
from slkit.core.records import mark_done, read_records, write_jsonl_atomic
from slkit.core.schema import DraftRecord, ExtensionsSummary
from slkit.engines import stable_seed
from slkit.engines.base import CapTally
from slkit.method.extensions import extend_drafts
from slkit.method.training_sets import resample_by_length
from slkit.stages.common import generate_records, skip_when_done


@skip_when_done("extensions")
def extensions_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """drafts.jsonl -> resampled_drafts.jsonl -> extensions.jsonl.

    With drafts.resample, the drafts first go through the length-biased resampling, ranked within their
    language (as the reference does before extending them). resampled_drafts.jsonl holds the drafts that
    are extended: the dropped ones are those of drafts.jsonl not in it, and the summary counts both
    ("drafts", "resampled_drafts"). The draw is seeded by (seed, iteration) over the drafts in id order,
    so a resumed stage extends the same drafts. Each kept draft then gets extensions.samples_per_draft
    two-phase extension jobs ("jobs"), each kept when > min_ratio x draft.
    """
    out = iter_dir(run_dir, iteration)
    # In id order: files hold records in completion order, which a resumed stage changes.
    drafts = sorted(read_records(out / "drafts.jsonl", DraftRecord), key=lambda r: r["id"])
    rp = params.resampling
    kept = (resample_by_length(drafts, random.Random(stable_seed(params.seed, iteration, "resample drafts")),
                               rp.coefficient, rp.exponent, group="language") if params.drafts.resample else drafts)
    write_jsonl_atomic(out / "resampled_drafts.jsonl", kept)
    jobs = len(kept) * params.extensions.samples_per_draft
    caps = CapTally()
    records, counts = generate_records(
        params, run_dir, iteration, "extensions", out / "extensions.jsonl", jobs,
        lambda engine, writer, on_done: extend_drafts(engine, kept, params, iteration, writer, params.quality, on_done),
        caps=caps, texts_per_item=2 * params.extensions.micro_iterations)  # two phases a micro-iteration
    summary = ExtensionsSummary(extensions=len(records), drafts=len(drafts), resampled_drafts=len(kept), jobs=jobs,
                                counts=dict(counts), finish_share=params.extensions.finish_share,
                                capped=caps.summary()).model_dump()
    mark_done(out, "extensions", summary)
    return summary
