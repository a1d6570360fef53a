"""The training stage: extensions resampled by length become both training sets; a LoRA adapter is
trained on each -> resampled_extensions.jsonl, generator_sft.jsonl, extender_sft.jsonl, adapters/{generator,extender}."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

from slkit.core.layout import ROLES, adapter_dir, current_adapters, iter_dir
from slkit.core.params import Params
from slkit.core.records import Progress, mark_done, read_document, read_records, write_jsonl_atomic
from slkit.core.schema import AdapterTrainingSummary, ExtensionRecord, TrainingSummary
from slkit.engines import stable_seed
from slkit.engines.server import asleep_for_training
from slkit.method.training_sets import extender_examples, generator_examples, resample_by_length
from slkit.stages.common import skip_when_done
from slkit.training.adapters import train_adapter
from slkit.training.distributed import train_at_once


@skip_when_done("training")
def training_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """extensions.jsonl -> resampled_extensions.jsonl, {generator,extender}_sft.jsonl, adapters/{generator,extender}."""
    out = iter_dir(run_dir, iteration)
    # In id order: files hold records in completion order, which a resumed stage changes.
    extensions = sorted(read_records(out / "extensions.jsonl", ExtensionRecord), key=lambda r: r["id"])
    rng = random.Random(stable_seed(params.seed, iteration, "train"))
    rp = params.resampling
    kept = resample_by_length(extensions, rng, rp.coefficient, rp.exponent, group="language") if rp.enabled else extensions
    write_jsonl_atomic(out / "resampled_extensions.jsonl", kept)
    write_jsonl_atomic(out / "generator_sft.jsonl", generator_examples(kept))
    write_jsonl_atomic(out / "extender_sft.jsonl", extender_examples(kept, params.training.line_keep_prob, rng))
    trained: dict[str, Any] = {}
    progress = Progress(out, "training", len(ROLES))
    previous = current_adapters(run_dir, iteration) if params.training.continue_adapters else {}
    for role in ROLES:
        if (adapter_dir(run_dir, iteration, role) / "slkit-train.json").exists():
            trained[role] = read_document(adapter_dir(run_dir, iteration, role) / "slkit-train.json",
                                          AdapterTrainingSummary)
            progress.advance()
    to_train = [role for role in ROLES if role not in trained]
    # The run's vLLM server (slkit.engines.server) sleeps while both adapters train, when the params say so.
    with asleep_for_training(params, run_dir, "training") if to_train else contextlib.nullcontext():
        if params.training.adapters_at_once and len(to_train) > 1 and params.training.num_processes == 1:
            trained.update(train_at_once(params, {role: (out / f"{role}_sft.jsonl", adapter_dir(run_dir, iteration, role),
                                                         previous.get(role)) for role in to_train}))
            progress.advance(len(to_train))
        for role in [role for role in to_train if role not in trained]:
            trained[role] = train_adapter(params, out / f"{role}_sft.jsonl", adapter_dir(run_dir, iteration, role),
                                          init_adapter=previous.get(role))
            progress.advance()
    trained = {role: trained[role] for role in ROLES}
    summary = TrainingSummary(extensions=len(extensions), resampled_extensions=len(kept), **trained).model_dump()
    mark_done(out, "training", summary)
    return summary
