"""The final stage, after the last macro-iteration: long (query, response) pairs of the whole run get a length
constraint their response meets, the query is rewritten to carry it, and a last Generator adapter is trained on
them -> length_control/constrained.jsonl, generator_sft.jsonl, adapters/generator, length_control.json."""
from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from slkit.engines import Request, stable_seed
from slkit.engines.base import CapTally
from slkit.method.drafts import write_drafts
from slkit.method.length_control import (assign_constraint, names_length, rewrite_failure, rewrite_prompt, satisfies,
                                         template_rewrite)
from slkit.method.queries import synthesize_queries
from slkit.running.layout import adapter_dir, iter_dir, load_run_params, stage_dir
from slkit.running.params import Params
from slkit.running.records import mark_done, read_document, read_records, write_json_atomic, write_jsonl_atomic
from slkit.running.schema import (AdapterTrainingSummary, AfterIteration, CollectionSummary, ConstrainedRecord,
                                  EvaluationSummary, LengthControlSummary, StoredConstraint, TrainingExample,
                                  record_type)
from slkit.stages.common import StageEngine, earlier_queries, exemplar_pool, generate_records, skip_when_done, with_sleep_mode
from slkit.stages.evaluation import score_benchmark
from slkit.training.adapters import train_adapter


# The final stage's collection pass: names its query ids (collect-q<slot>) and seeds its sampling.
COLLECTION = "collect"


# The response field of each file the final stage takes pairs from.
RESPONSE_FIELDS = {"drafts.jsonl": "draft", "extensions.jsonl": "extended"}


def _discard_stale_results(out: Path, iteration: int) -> None:
    """A final stage built after another last iteration (a run resumed with more macro_iterations, finished
    or killed) is stale: remove its files but the executed notebook and the lock, then record `iteration`."""
    record = out / "after_iteration.json"
    built_after = read_document(record, AfterIteration)["iteration"] if record.exists() else None
    if built_after == iteration:
        return
    if built_after is not None and built_after > iteration:  # never throw away work built on later iterations
        raise ValueError(f"{out} was built after iteration {built_after}; run the final stage with iteration "
                         f"{built_after} (the run's last macro-iteration), not {iteration}")
    for path in out.iterdir():
        if path.suffix not in (".ipynb", ".lock"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json_atomic(record, AfterIteration(iteration=iteration))


def collect_drafts(run_dir: str | Path, iteration: int, params: Params, out: Path,
                   engines: StageEngine, caps: CapTally | None = None) -> CollectionSummary | None:
    """The collection pass of the final stage: length_control.collect_queries new self-instructed queries,
    answered by the last iteration's Generator -> out/queries.jsonl, out/drafts.jsonl (resumable). Both run on
    `engines` (holding that Generator), left open for the rest of the stage; their texts count in `caps`. None
    when the pass is off."""
    count = params.length_control.collect_queries
    if not count:
        return None
    earlier = earlier_queries(run_dir, iteration + 1)
    pool = exemplar_pool(params, earlier)
    # synthesize_queries makes queries.per_language queries in each language: here the collection's count.
    sized = params.model_copy(update={"queries": params.queries.model_copy(update={"per_language": count})})
    queries, rejected = generate_records(
        run_dir, iteration, "length_control (collect queries)", "queries.jsonl", count * len(params.queries.languages),
        lambda engine, writer, on_done: synthesize_queries(engine, pool, [r["query"] for r in earlier], sized,
                                                           COLLECTION, writer, on_done), out=out, shared=engines,
        caps=caps, texts_per_item=2 if params.queries.judge else 1)
    drafts, refused = generate_records(
        run_dir, iteration, "length_control (collect drafts)", "drafts.jsonl",
        len(queries) * params.drafts.samples_per_query,
        lambda engine, writer, on_done: write_drafts(engine, queries, params, COLLECTION, writer, params.quality,
                                                     on_done), out=out, shared=engines, caps=caps)
    return CollectionSummary(queries=len(queries), drafts=len(drafts), rejected_queries=dict(rejected),
                             rejected_drafts=dict(refused))


def long_responses(run_dir: str | Path, iteration: int, params: Params) -> list[dict]:
    """(query, response) pairs in the length-control window, in id order: the drafts and extensions of
    every iteration up to `iteration`, and the collection pass's drafts."""
    lc = params.length_control
    paths = [iter_dir(run_dir, k) / name for k in range(1, iteration + 1) for name in RESPONSE_FIELDS]
    paths.append(stage_dir(run_dir, iteration, "length_control") / "drafts.jsonl")
    pairs = []
    for path in paths:
        if path.exists():
            source = f"{path.parent.name}/{path.stem}"
            pairs += [{"id": r["id"], "query": r["query"], "language": r["language"], "words": r["words"],
                       "response": r[RESPONSE_FIELDS[path.name]], "source": source}
                      for r in read_records(path, record_type(path)) if lc.min_words <= r["words"] <= lc.max_words]
    return sorted(pairs, key=lambda p: p["id"])


@skip_when_done("length_control")
def length_control_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """Every iteration's drafts and extensions, and the collection pass's drafts, in the word window ->
    length_control/constrained.jsonl (queries carrying a length their response meets), a final Generator
    adapter trained on them, length scores before and after. Records the iteration it ran after."""
    params = load_run_params(run_dir)
    lc = params.length_control
    out = stage_dir(run_dir, iteration, "length_control")
    out.mkdir(parents=True, exist_ok=True)
    _discard_stale_results(out, iteration)
    # Every generation before training runs on one engine: the last iteration's Generator for the collection,
    # the base model (role None) for the rewrites. It is closed before training and, built with vLLM's sleep
    # mode, gives its GPU memory back to training and to the scoring engine; that one is the process's last
    # and is built without it (vLLM's sleep-mode allocator takes one engine per process).
    last = adapter_dir(run_dir, iteration, "generator")
    caps = CapTally()  # of the texts generated before training: the collection pass and the model's rewrites
    with StageEngine(with_sleep_mode(params, True), {"generator": str(last)}) as engines:
        collection = collect_drafts(run_dir, iteration, params, out, engines, caps)
        found = long_responses(run_dir, iteration, params)
        # A query that already names a length would carry two limits: skipped (and counted), not rewritten.
        pairs = [p for p in found if not names_length(p["query"])]
        rng = random.Random(stable_seed(params.seed, "length_control"))
        assignments = [assign_constraint(p["words"], rng, lc.round_to, lc.min_words, lc.max_words,
                                         dict(lc.proportions), lc.coarse_prob) for p in pairs]
        constraints = [a.constraint for a in assignments]
        rewrites = [template_rewrite(p["query"], c, p["language"], rng) for p, c in zip(pairs, constraints)]
        how = ["template"] * len(pairs)
        refused: Counter = Counter()
        if lc.rewrite == "model" and pairs:
            engine = engines.get()
            requests = [Request(engine.render(rewrite_prompt(p["query"], c, p["language"], rng)), None,
                                params.queries.max_new_tokens, stable_seed(params.seed, "rewrite", p["id"]))
                        for p, c in zip(pairs, constraints)]
            asked = engine.generate(requests, params.sampling)
            caps.add(requests, asked)
            for i, (p, c, text) in enumerate(zip(pairs, constraints, asked)):
                failure = rewrite_failure(p["query"], text, c)
                if failure:
                    refused[failure] += 1
                else:
                    rewrites[i], how[i] = text.strip(), "model"
    records = []
    for p, a, query, h in zip(pairs, assignments, rewrites, how):
        c = a.constraint
        if not satisfies(c, p["words"]):  # cannot happen by construction; never train on a false constraint
            raise AssertionError(f"constraint {c} is not true of {p['id']} ({p['words']} words)")
        records.append(ConstrainedRecord(
            id=p["id"], query=query, original_query=p["query"], language=p["language"],
            constraint=StoredConstraint(kind=c.kind, low=c.low, high=c.high), fallback=a.fallback, words=p["words"],
            source=p["source"], rewrite=h, completion=p["response"]))
    write_jsonl_atomic(out / "constrained.jsonl", records)
    write_jsonl_atomic(out / "generator_sft.jsonl",
                       [TrainingExample(id=r.id, prompt=r.query, completion=r.completion) for r in records])
    init = None if lc.fresh_adapter or not (last / "adapter_config.json").exists() else str(last)
    final = out / "adapters" / "generator"
    training = (read_document(final / "slkit-train.json", AdapterTrainingSummary)
                if (final / "slkit-train.json").exists()
                else train_adapter(params, out / "generator_sft.jsonl", final, init_adapter=init))
    before = read_document(iter_dir(run_dir, iteration) / "evaluation.json", EvaluationSummary)["length_following"]
    after = score_benchmark(with_sleep_mode(params, False), {"generator": str(final)}, out, "length_control")
    summary = LengthControlSummary(
        pairs=len(records), sources=dict(Counter(r.source for r in records)),
        skipped={"names_length": len(found) - len(pairs)}, collection=collection,
        kinds=dict(Counter(r.constraint.kind for r in records)),
        fallbacks=dict(Counter(r.fallback for r in records if r.fallback)),
        rewrites=dict(Counter(how)), model_rewrites_refused=dict(refused),
        training={**training, "losses": []}, length_before=before, length_after=after,
        capped=caps.summary()).model_dump()
    write_json_atomic(out / "length_control.json", summary)
    mark_done(out, "length_control", summary, iteration=iteration)
    return summary
