"""The final stage, after the last macro-iteration: long (query, response) pairs of the whole run get a length
constraint their response meets, the query is rewritten to carry it, and a last Generator adapter is trained on
them -> length_control/constrained.jsonl, generator_sft.jsonl, adapters/generator, length_control.json.

It runs in three phases, each resumable from its files in length_control/: "constrain" (the collection pass and
the rewrites, on one engine -> queries.jsonl, drafts.jsonl, constrained.jsonl, generator_sft.jsonl and their counts
in constrained.json, written last), the training of the final adapter, and "score" (that adapter on the benchmark ->
benchmark_outputs.jsonl). With the run's vLLM server (slkit.engines.server) every phase runs in the stage process
on it, and the server sleeps while the adapter trains (engine.vllm.sleep_during_training). Without one, vLLM keeps
its GPU memory until its process ends, and a second engine in the same process failed on the H200 even after the
first was put to sleep, so with engine.backend vllm each engine phase runs in a child process of its own:

    python -m slkit.stages.length_control PHASE RUN_DIR ITERATION REPLY_DIR
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from slkit.core.layout import adapter_dir, iter_dir, load_run_params, stage_dir
from slkit.core.params import Params
from slkit.core.records import (
    mark_done,
    read_document,
    read_json,
    read_records,
    write_json_atomic,
    write_jsonl_atomic,
)
from slkit.core.schema import (
    AdapterTrainingSummary,
    AfterIteration,
    CollectionSummary,
    ConstrainedCounts,
    ConstrainedRecord,
    EvaluationSummary,
    LengthControlSummary,
    StoredConstraint,
    TrainingExample,
    record_type,
)
from slkit.engines import Request, stable_seed
from slkit.engines.base import CapTally
from slkit.engines.server import asleep_for_training, live_server, wants_server
from slkit.method.drafts import write_drafts
from slkit.method.length_control import (
    assign_constraint,
    names_length,
    rewrite_failure,
    rewrite_prompt,
    satisfies,
    template_rewrite,
)
from slkit.method.queries import synthesize_queries
from slkit.method.training_sets import resample_by_length
from slkit.stages.common import StageEngine, earlier_queries, exemplar_pool, generate_records, skip_when_done
from slkit.stages.evaluation import score_benchmark
from slkit.training.adapters import train_adapter

# The final stage's collection pass: names its query ids (collect-q<slot>) and seeds its sampling.
COLLECTION = "collect"


# The files of each iteration the final stage takes pairs from, and their response field: the drafts and the
# extensions the length-biased resampling kept, as the reference's collection reads its saved (resampled) sets.
RESPONSE_FIELDS = {"resampled_drafts.jsonl": "draft", "resampled_extensions.jsonl": "extended", "drafts.jsonl": "draft"}


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
    `engines` (holding that Generator), left open for the rest of the phase; their texts count in `caps`. None
    when the pass is off."""
    count = params.length_control.collect_queries
    if not count:
        return None
    earlier = earlier_queries(run_dir, iteration + 1)
    pool = exemplar_pool(params, earlier)
    # synthesize_queries makes queries.per_language queries in each language: here the collection's count.
    sized = params.model_copy(update={"queries": params.queries.model_copy(update={"per_language": count})})
    queries, rejected = generate_records(
        params, run_dir, iteration, "length_control (collect queries)", out / "queries.jsonl",
        count * len(params.queries.languages),
        lambda engine, writer, on_done: synthesize_queries(engine, pool, [r["query"] for r in earlier], sized,
                                                           COLLECTION, writer, on_done), shared=engines,
        caps=caps, texts_per_item=2 if params.queries.judge else 1)
    drafts, refused = generate_records(
        params, run_dir, iteration, "length_control (collect drafts)", out / "drafts.jsonl",
        len(queries) * params.drafts.samples_per_query,
        lambda engine, writer, on_done: write_drafts(engine, queries, params, COLLECTION, writer, params.quality,
                                                     on_done), shared=engines, caps=caps)
    return CollectionSummary(queries=len(queries), drafts=len(drafts), rejected_queries=dict(rejected),
                             rejected_drafts=dict(refused))


def long_responses(run_dir: str | Path, iteration: int, params: Params) -> list[dict]:
    """(query, response) pairs in the length-control window, in id order: the resampled drafts and resampled
    extensions of every iteration up to `iteration`, and the collection pass's drafts after the same resampling
    of drafts (drafts.resample), as the reference resamples every set it saves."""
    lc = params.length_control
    paths = [iter_dir(run_dir, k) / name for k in range(1, iteration + 1)
             for name in ("resampled_drafts.jsonl", "resampled_extensions.jsonl")]
    collected = stage_dir(run_dir, iteration, "length_control") / "drafts.jsonl"
    pairs = []
    for path in paths + [collected]:
        if path.exists():
            source = f"{path.parent.name}/{path.stem}"
            records = read_records(path, record_type(path))
            if path == collected and params.drafts.resample:
                rp = params.resampling
                records = resample_by_length(sorted(records, key=lambda r: r["id"]),
                                             random.Random(stable_seed(params.seed, COLLECTION, "resample drafts")),
                                             rp.coefficient, rp.exponent, group="language")
            pairs += [{"id": r["id"], "query": r["query"], "language": r["language"], "words": r["words"],
                       "response": r[RESPONSE_FIELDS[path.name]], "source": source}
                      for r in records if lc.min_words <= r["words"] <= lc.max_words]
    return sorted(pairs, key=lambda p: p["id"])


def constrain_pairs(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """Phase "constrain": the collection pass, then every pair in the word window gets a constraint its response
    meets and a query that carries it -> constrained.jsonl, generator_sft.jsonl, and their counts in
    constrained.json (written last: a phase that has it is done, and returns it)."""
    out = stage_dir(run_dir, iteration, "length_control")
    if (out / "constrained.json").exists():
        return read_document(out / "constrained.json", ConstrainedCounts)
    lc = params.length_control
    # Every generation of the phase runs on one engine: the last iteration's Generator for the collection, the
    # base model (role None) for the rewrites.
    caps = CapTally()  # of the texts generated in the phase: the collection pass and the model's rewrites
    with StageEngine(params, {"generator": str(adapter_dir(run_dir, iteration, "generator"))}) as engines:
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
    counts = ConstrainedCounts(
        pairs=len(records), sources=dict(Counter(r.source for r in records)),
        skipped={"names_length": len(found) - len(pairs)}, collection=collection,
        kinds=dict(Counter(r.constraint.kind for r in records)),
        fallbacks=dict(Counter(r.fallback for r in records if r.fallback)),
        rewrites=dict(Counter(how)), model_rewrites_refused=dict(refused), capped=caps.summary())
    write_json_atomic(out / "constrained.json", counts)
    return counts.model_dump()


def final_adapter_dir(run_dir: str | Path, iteration: int) -> Path:
    return stage_dir(run_dir, iteration, "length_control") / "adapters" / "generator"


def score_final_adapter(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any] | None:
    """Phase "score": the final adapter answers the benchmark -> benchmark_outputs.jsonl (resumable); its length
    scores, or None without a benchmark."""
    return score_benchmark(params, {"generator": str(final_adapter_dir(run_dir, iteration))},
                           stage_dir(run_dir, iteration, "length_control"), "length_control")


# The phases that start an engine, by the name a child process is given.
PHASES: dict[str, Callable[[str | Path, int, Params], Any]] = {"constrain": constrain_pairs,
                                                             "score": score_final_adapter}


class ChildPhaseError(RuntimeError):
    """A phase failed in its child process: the child's error type and message, raised in the stage process."""

    def __init__(self, phase: str, child_error: str, message: str):
        super().__init__(f"length_control: the {phase} phase failed in its child process: {child_error}: {message}. "
                         "Finished work is kept: rerun the stage to resume.")
        self.child_error = child_error  # the type's name: skip_when_done turns an OutOfMemoryError into advice


def run_phase(phase: str, run_dir: str | Path, iteration: int, params: Params) -> Any:
    """The phase's result. On vLLM without the run's server it runs in a child process, whose engine's memory goes
    back when it ends, so this process starts no engine; on the run's server, and on other backends (a closed
    engine's memory goes back), it runs here."""
    if params.engine.backend != "vllm" or (wants_server(params) and live_server(run_dir, params.model.path)):
        return PHASES[phase](run_dir, iteration, params)
    return run_in_child(phase, run_dir, iteration)


def run_in_child(phase: str, run_dir: str | Path, iteration: int) -> Any:
    """Run PHASES[phase] in a fresh Python process of this slkit, which reads the run's params: its output streams
    are this process's (logs and tracebacks show as they come), its result or its error comes back as json through
    a temporary directory."""
    if torch.cuda.is_initialized():  # training ran here: what the child's engine will find
        free, total = torch.cuda.mem_get_info()
        print(f"length_control: the {phase} phase starts in a child process; GPU memory free: "
              f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB", flush=True)
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports the slkit this process runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="slkit-phase-") as reply:
        done = subprocess.run([sys.executable, "-m", "slkit.stages.length_control", phase, str(run_dir),
                               str(iteration), reply], env=env)
        error, result = Path(reply) / "error.json", Path(reply) / "result.json"
        if error.exists():
            failure = read_json(error)
            raise ChildPhaseError(phase, failure["type"], failure["message"])
        if done.returncode or not result.exists():  # killed before it could say why (e.g. by the kernel's OOM killer)
            raise ChildPhaseError(phase, "exit status", f"{done.returncode} without an error of its own; its output "
                                  "above says how far it got")
        return read_json(result)["result"]


def _end_with_parent() -> None:
    """A child ends when its stage process is killed (`slkit run` stops an orphaned kernel with SIGKILL), so that
    its engine does not keep the GPU's memory (Linux: PR_SET_PDEATHSIG; vLLM runs on Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def main(argv: list[str]) -> None:
    """A child process: run one phase, write {"result": ...} or its error's type and message to REPLY_DIR."""
    phase, run_dir, iteration, reply = argv
    _end_with_parent()
    try:
        result = PHASES[phase](run_dir, int(iteration), load_run_params(run_dir))
    except BaseException as err:  # KeyboardInterrupt too: the stage process says why its child stopped
        (Path(reply) / "error.json").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
        raise
    (Path(reply) / "result.json").write_text(json.dumps({"result": result}))  # a temporary reply, not a run file


@skip_when_done("length_control")
def length_control_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """Every iteration's drafts and extensions, and the collection pass's drafts, in the word window ->
    length_control/constrained.jsonl (queries carrying a length their response meets), a final Generator
    adapter trained on them, length scores before and after. Records the iteration it ran after."""
    out = stage_dir(run_dir, iteration, "length_control")
    out.mkdir(parents=True, exist_ok=True)
    _discard_stale_results(out, iteration)
    counts = run_phase("constrain", run_dir, iteration, params)
    last = adapter_dir(run_dir, iteration, "generator")
    init = None if params.length_control.fresh_adapter or not (last / "adapter_config.json").exists() else str(last)
    final = final_adapter_dir(run_dir, iteration)
    # Training runs here: on vLLM no engine was started in this process (the constrain phase's child has ended,
    # and its memory with it). What training leaves in torch's cache goes back before the scoring engine starts.
    if (final / "slkit-train.json").exists():
        training = read_document(final / "slkit-train.json", AdapterTrainingSummary)
    else:
        with asleep_for_training(params, run_dir, "length_control"):
            training = train_adapter(params, out / "generator_sft.jsonl", final, init_adapter=init)
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    before = read_document(iter_dir(run_dir, iteration) / "evaluation.json", EvaluationSummary)["length_following"]
    after = run_phase("score", run_dir, iteration, params)
    summary = LengthControlSummary(**counts, training={**training, "losses": []}, length_before=before,
                                   length_after=after).model_dump()
    write_json_atomic(out / "length_control.json", summary)
    mark_done(out, "length_control", summary, iteration=iteration)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
