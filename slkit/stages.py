"""The five stages of a macro-iteration and the final length-control stage, each a function from files to files.

Every stage reads and writes runs/<run>/iter_<k>/ (the final one runs/<run>/length_control/), records its summary in <stage>.done.json last,
and returns that summary. The notebooks call these and show the results; `slkit run` skips a
stage whose done-marker exists. A killed stage resumes from its `.partial` records.
"""
from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

from slkit.engines import load_engine, stable_seed
from slkit.params import Params, load_params
from slkit.records import (Progress, RecordWriter, done_marker, mark_done, read_json, read_jsonl, write_json_atomic,
                           write_jsonl_atomic)
from slkit.runlock import boot_id, lock_for_stage

STAGES = ("seed", "generate", "extend", "train", "evaluate")
ROLES = ("generator", "extender")


BASELINE = 0  # the "iteration" of the untrained base model, evaluated before the first macro-iteration


def iter_dir(run_dir: str | Path, iteration: int) -> Path:
    """runs/<run>/iter_<k>/, or runs/<run>/baseline/ for the base model's evaluation (iteration 0)."""
    return Path(run_dir) / ("baseline" if iteration == BASELINE else f"iter_{iteration}")


def adapter_dir(run_dir: str | Path, iteration: int, role: str) -> Path:
    return iter_dir(run_dir, iteration) / "adapters" / role


def current_adapters(run_dir: str | Path, iteration: int) -> dict[str, str | None]:
    """Adapters that generate in `iteration`: the previous iteration's, or None (base model) in iteration 1."""
    previous = {role: adapter_dir(run_dir, iteration - 1, role) for role in ROLES}
    return {role: str(p) if (p / "adapter_config.json").exists() else None for role, p in previous.items()}


def load_run_params(run_dir: str | Path) -> Params:
    return load_params(Path(run_dir) / "params.yaml")


def _prepare(run_dir: str | Path, iteration: int) -> tuple[Params, Path]:
    params = load_run_params(run_dir)
    out = iter_dir(run_dir, iteration)
    out.mkdir(parents=True, exist_ok=True)
    return params, out


OOM_ADVICE = {
    "train": ("lower training.max_length (now {t.max_length}) or training.batch_size (now {t.batch_size}), or set "
              "training.activation_offload: true, training.mlp_tile_tokens: 4096, training.liger_kernels: true"),
    "generation": ("lower engine.batch_size (now {e.batch_size}) or the stage's max_new_tokens "
                   "(sampling.max_new_tokens is {s.max_new_tokens}), or set model.load_in_4bit: true"),
}


def stage_dir(run_dir: str | Path, iteration: int, stage: str) -> Path:
    """Where a stage writes: iter_<k>/, or length_control/ for the final stage."""
    return Path(run_dir) / "length_control" if stage == "length_control" else iter_dir(run_dir, iteration)


def lock_path(run_dir: str | Path, iteration: int, stage: str) -> Path:
    """Holds the PID of the process running a stage, so a resumed run can stop an orphaned kernel."""
    return stage_dir(run_dir, iteration, stage) / f"{stage}.lock"


def stage_done(run_dir: str | Path, iteration: int, stage: str) -> bool:
    """Whether the stage has finished: its done-marker exists, and the final stage's records that it ran
    after this iteration (a run resumed with more macro_iterations reruns it on the new last iteration)."""
    marker = done_marker(stage_dir(run_dir, iteration, stage), stage)
    return marker.exists() and (stage != "length_control" or read_json(marker).get("iteration") == iteration)


def skip_when_done(stage: str) -> Callable:
    """A finished stage returns its recorded summary instead of running again. A running stage
    leaves its PID in <stage>.lock; out of GPU memory, it stops with the params to lower."""
    def wrap(fn: Callable[[str | Path, int], dict[str, Any]]) -> Callable[[str | Path, int], dict[str, Any]]:
        @functools.wraps(fn)
        def run(run_dir: str | Path, iteration: int) -> dict[str, Any]:
            if stage_done(run_dir, iteration, stage):
                return read_json(done_marker(stage_dir(run_dir, iteration, stage), stage))["summary"]
            run_lock = lock_for_stage(run_dir, stage)  # refused while another run holds run_dir
            lock = lock_path(run_dir, iteration, stage)
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(f"{os.getpid()} {boot_id()}")  # the PID means something on this boot only
            try:
                return fn(run_dir, iteration)
            except Exception as err:
                if type(err).__name__ != "OutOfMemoryError":
                    raise
                p = load_run_params(run_dir)
                advice = OOM_ADVICE["train" if stage == "train" else "generation"].format(
                    t=p.training, e=p.engine, s=p.sampling)
                raise MemoryError(f"out of GPU memory in stage {stage} of iteration {iteration}: {advice}. "
                                  f"Finished work is kept: rerun slkit run with --set KEY=VALUE to resume.") from err
            finally:
                lock.unlink(missing_ok=True)
                if run_lock:
                    run_lock.release()
        return run
    return wrap


def _generate_records(run_dir: str | Path, iteration: int, stage: str, output: str, total: int,
                      work: Callable[..., Counter], out: Path | None = None,
                      shared: StageEngine | None = None) -> tuple[list[dict], Counter]:
    """Run `work(engine, writer, on_done)` with this iteration's adapters, writing `output` in the iteration's
    directory (or `out`) incrementally. A finished `output` is read, not rewritten. With `shared`, its engine
    is used and left open for the rest of the stage."""
    params, iteration_out = _prepare(run_dir, iteration)
    out = out or iteration_out
    if (out / output).exists():
        return read_jsonl(out / output), Counter()
    with RecordWriter(out / output) as writer:
        progress = Progress(out, stage, total, len(writer.records))
        with stage_engine(shared, params, current_adapters(run_dir, iteration)) as engine:
            counts = work(engine, writer, progress.advance)
        return writer.finish(), counts


def _earlier_queries(run_dir: str | Path, iteration: int) -> list[dict]:
    return [r for k in range(1, iteration) for r in read_jsonl(iter_dir(run_dir, k) / "queries.jsonl")]


def _query_pool(params: Params, earlier: list[dict]) -> list[dict]:
    """The examples self-instruct imitates: the seeds, plus earlier queries when queries.grow_pool."""
    from slkit.seeds import load_seeds

    pool = load_seeds(params.queries.seed_files)
    if params.queries.grow_pool:  # earlier iterations' queries are examples too
        pool += [{"query": r["query"], "language": r["language"]} for r in earlier]
    return pool


@skip_when_done("seed")
def seed_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """-> queries.jsonl: new queries by self-instruct, judged, length-filtered, deduplicated."""
    from slkit.queries import synthesize_queries

    params, out = _prepare(run_dir, iteration)
    earlier = _earlier_queries(run_dir, iteration)
    pool = _query_pool(params, earlier)
    records, rejected = _generate_records(
        run_dir, iteration, "seed", "queries.jsonl", params.queries.per_language * len(params.queries.languages),
        lambda engine, writer, on_done: synthesize_queries(engine, pool, [r["query"] for r in earlier], params,
                                                           iteration, writer, on_done))
    summary = {"queries": len(records), "rejected": dict(rejected), "pool_size": len(pool)}
    mark_done(out, "seed", summary)
    return summary


@skip_when_done("generate")
def generate_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """queries.jsonl -> drafts.jsonl: Generator drafts that pass the quality check."""
    from slkit.drafts import write_drafts

    params, out = _prepare(run_dir, iteration)
    queries = read_jsonl(out / "queries.jsonl")
    records, rejected = _generate_records(
        run_dir, iteration, "generate", "drafts.jsonl", len(queries) * params.drafts.samples_per_query,
        lambda engine, writer, on_done: write_drafts(engine, queries, params, iteration, writer, params.quality, on_done))
    summary = {"drafts": len(records), "rejected": dict(rejected)}
    mark_done(out, "generate", summary)
    return summary


@skip_when_done("extend")
def extend_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """drafts.jsonl -> resampled_drafts.jsonl -> extensions.jsonl.

    With drafts.resample, the drafts first go through the length-biased resampling, ranked within their
    language (as the reference does before extending them). resampled_drafts.jsonl holds the drafts that
    are extended: the dropped ones are those of drafts.jsonl not in it, and the summary counts both
    ("drafts", "resampled_drafts"). The draw is seeded by (seed, iteration) over the drafts in id order,
    so a resumed stage extends the same drafts. Each kept draft then gets extension.samples_per_draft
    two-stage extension jobs ("jobs"), each kept when > min_ratio x draft.
    """
    from slkit.extension import extend_drafts
    from slkit.trainsets import resample_by_length

    params, out = _prepare(run_dir, iteration)
    # In id order: files hold records in completion order, which a resumed stage changes.
    drafts = sorted(read_jsonl(out / "drafts.jsonl"), key=lambda r: r["id"])
    rp = params.resampling
    kept = (resample_by_length(drafts, random.Random(stable_seed(params.seed, iteration, "resample drafts")),
                               rp.coefficient, rp.exponent, group="language") if params.drafts.resample else drafts)
    write_jsonl_atomic(out / "resampled_drafts.jsonl", kept)
    jobs = len(kept) * params.extension.samples_per_draft
    records, counts = _generate_records(
        run_dir, iteration, "extend", "extensions.jsonl", jobs,
        lambda engine, writer, on_done: extend_drafts(engine, kept, params, iteration, writer, params.quality, on_done))
    summary = {"extensions": len(records), "drafts": len(drafts), "resampled_drafts": len(kept), "jobs": jobs,
               "counts": dict(counts)}
    mark_done(out, "extend", summary)
    return summary


@skip_when_done("train")
def train_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """extensions.jsonl -> resampled.jsonl, {generator,extender}_sft.jsonl, adapters/{generator,extender}."""
    from slkit.trainsets import extender_examples, generator_examples, resample_by_length
    from slkit.training import train_adapter

    params, out = _prepare(run_dir, iteration)
    # In id order: files hold records in completion order, which a resumed stage changes.
    extensions = sorted(read_jsonl(out / "extensions.jsonl"), key=lambda r: r["id"])
    rng = random.Random(stable_seed(params.seed, iteration, "train"))
    rp = params.resampling
    kept = resample_by_length(extensions, rng, rp.coefficient, rp.exponent, group="language") if rp.enabled else extensions
    write_jsonl_atomic(out / "resampled.jsonl", kept)
    write_jsonl_atomic(out / "generator_sft.jsonl", generator_examples(kept))
    write_jsonl_atomic(out / "extender_sft.jsonl", extender_examples(kept, params.training.line_keep_prob, rng))
    summary: dict[str, Any] = {"extensions": len(extensions), "resampled": len(kept)}
    progress = Progress(out, "train", len(ROLES))
    previous = current_adapters(run_dir, iteration) if params.training.continue_adapters else {}
    for role in ROLES:
        if (adapter_dir(run_dir, iteration, role) / "slkit-train.json").exists():
            summary[role] = read_json(adapter_dir(run_dir, iteration, role) / "slkit-train.json")
        else:
            summary[role] = train_adapter(params, out / f"{role}_sft.jsonl", adapter_dir(run_dir, iteration, role),
                                          init_adapter=previous.get(role))
        progress.advance()
    mark_done(out, "train", summary)
    return summary


class StageEngine:
    """A stage's engine, started at its first use and closed once by the stage. vLLM keeps the GPU memory
    it reserved until its process ends, so a second engine started in the same stage process does not fit
    (measured on an H200: 20 of 140 GiB free after the first closed): the parts of a stage that run on the
    same model and backend share this one (the base model is role None beside the LoRA roles). An engine
    that training or another engine follows in the process is built with_sleep_mode, and then gives its
    memory back when closed."""

    def __init__(self, params: Params, adapters: dict[str, str | None]):
        self.params, self.adapters, self.engine = params, adapters, None

    def get(self):
        if self.engine is None:
            self.engine = load_engine(self.params, self.adapters)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@contextlib.contextmanager
def stage_engine(shared: StageEngine | None, params: Params, adapters: dict[str, str | None]) -> Iterator[Any]:
    """`shared`'s engine, left open for the rest of the stage; without one, an engine of `params` with
    `adapters`, closed when the block ends (also when it raises)."""
    if shared is not None:
        yield shared.get()
        return
    own = StageEngine(params, adapters)
    try:
        yield own.get()
    finally:
        own.close()


def with_sleep_mode(params: Params, on: bool) -> Params:
    """`params` whose vLLM engine gives its GPU memory back when closed (on), or keeps it until the process
    ends (off). vLLM's sleep-mode allocator takes one engine per process: only the first engine of a process
    that is followed by more GPU work gets it. Other backends ignore it."""
    vllm = params.engine.vllm.model_copy(update={"enable_sleep_mode": on})
    return params.model_copy(update={"engine": params.engine.model_copy(update={"vllm": vllm})})


def score_benchmark(params: Params, adapters: dict[str, str | None], out: Path, stage: str,
                    shared: StageEngine | None = None) -> dict[str, Any] | None:
    """The Generator answers the benchmark subset, evaluation.samples_per_query times each ->
    out/benchmark_outputs.jsonl (resumable); returns length scores and length stability. With `shared`,
    its engine (holding `adapters`) is used and left open for the rest of the stage."""
    from slkit.engines import Request
    from slkit.evaluation import (SCALES, length_stability, load_benchmark, output_lengths, score_length, stratified_subset,
                                  summarize_scores)

    ev = params.evaluation
    if not ev.benchmark:
        return None
    fmt, items = load_benchmark(ev.benchmark, ev.benchmark_format)
    if ev.max_required_words is not None:
        items = [item for item in items if item["required"] <= ev.max_required_words]
    subset = items if ev.subset_size is None else stratified_subset(items, ev.subset_size, params.seed)
    slots = [(i, k) for i in range(len(subset)) for k in range(ev.samples_per_query)]
    with RecordWriter(out / "benchmark_outputs.jsonl") as writer:
        done = {(r["index"], r["sample"]) for r in writer.records}
        todo = [(i, k) for i, k in slots if (i, k) not in done]
        progress = Progress(out, stage, len(slots), len(done))
        if todo:
            max_new = ev.max_new_tokens or params.sampling.max_new_tokens
            with stage_engine(shared, params, adapters) as engine:
                texts = engine.generate([Request(engine.render(subset[i]["query"]), "generator", max_new,
                                                 stable_seed(params.seed, "benchmark", i, k)) for i, k in todo],
                                        params.sampling, progress.advance)
            for (i, k), text in zip(todo, texts):
                item, lengths = subset[i], output_lengths(text, fmt)
                writer.write({"index": i, "sample": k, "query": item["query"], "language": item["language"],
                              "type": item["type"], "bin": item["bin"], "required": item["required"],
                              **({"interval": list(item["interval"])} if "interval" in item else {}),
                              **lengths, "score": score_length(item, lengths["words"], fmt), "output": text})
        scored = sorted(writer.finish(), key=lambda r: (r["index"], r["sample"]))
    return {"benchmark": Path(ev.benchmark).name if Path(ev.benchmark).exists() else ev.benchmark, "format": fmt,
            "max_score": SCALES[fmt], **summarize_scores(scored), "stability": length_stability(scored)}


def judge_stage_outputs(params: Params, out: Path, stage: str, shared: StageEngine | None = None) -> dict[str, Any] | None:
    """The judge scores the benchmark outputs of this stage -> out/judgements.jsonl; returns the summary.
    A judge that is the run's own model on the run's engine (judge.model and judge.engine unset) uses
    `shared`'s engine as the base model, instead of starting a second one."""
    from slkit.judge import judge_responses, summarize_judgements

    jp = params.evaluation.judge
    outputs = out / "benchmark_outputs.jsonl"
    if not jp.enabled or not outputs.exists():
        return None
    items = [r for r in read_jsonl(outputs) if r["sample"] < jp.samples_per_query]
    with RecordWriter(out / "judgements.jsonl") as writer:
        if len(writer.records) < len(items):
            own = jp.model is None and jp.engine is None
            judge_params = params.model_copy(update={"model": jp.model or params.model,
                                                     "engine": jp.engine or params.engine})
            progress = Progress(out, f"{stage} (judge)", len(items), len(writer.records))
            with stage_engine(shared if own else None, judge_params, {}) as engine:
                judge_responses(engine, items, jp, params.seed, writer, progress.advance)
        return summarize_judgements(writer.finish())


@skip_when_done("evaluate")
def evaluate_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """Benchmark with this iteration's Generator (length scores, stability, judge) -> benchmark_outputs.jsonl,
    judgements.jsonl, metrics.json and the figures of slkit.plots. Iteration 0 (BASELINE) evaluates the
    untrained base model with the same subset, samples and seeds, into runs/<run>/baseline/."""
    from slkit.reports import write_iteration_figures

    params, out = _prepare(run_dir, iteration)
    metrics: dict[str, Any] = {"iteration": iteration, "run": params.run_name}
    adapters = {} if iteration == BASELINE else {role: str(adapter_dir(run_dir, iteration, role)) for role in ROLES}
    engines = StageEngine(params, adapters)
    try:
        scores = score_benchmark(params, adapters, out, "evaluate", engines)
        judged = judge_stage_outputs(params, out, "evaluate", engines)
    finally:
        engines.close()
    if scores:
        metrics["length_following"] = scores
    if judged:
        metrics["judge"] = judged
    metrics["words"] = stage_word_means(out)
    metrics["counts"] = {name: sum(1 for _ in open(out / f"{name}.jsonl", encoding="utf-8"))
                         for name in WORD_FILES if (out / f"{name}.jsonl").exists()}
    metrics["figures"] = write_iteration_figures(run_dir, iteration, (scores or {}).get("max_score", 1.0))
    write_json_atomic(out / "metrics.json", metrics)
    mark_done(out, "evaluate", metrics)
    return metrics


# The final stage's collection pass: names its query ids (collect-q<slot>) and seeds its sampling.
COLLECTION = "collect"
# The response field of each file the final stage takes pairs from.
RESPONSE_FIELDS = {"drafts.jsonl": "draft", "extensions.jsonl": "extended"}


def _discard_stale_results(out: Path, iteration: int) -> None:
    """A final stage built after another last iteration (a run resumed with more macro_iterations, finished
    or killed) is stale: remove its files but the executed notebook and the lock, then record `iteration`."""
    record = out / "after_iteration.json"
    built_after = read_json(record)["iteration"] if record.exists() else None
    if built_after == iteration:
        return
    if built_after is not None and built_after > iteration:  # never throw away work built on later iterations
        raise ValueError(f"{out} was built after iteration {built_after}; run the final stage with iteration "
                         f"{built_after} (the run's last macro-iteration), not {iteration}")
    for path in out.iterdir():
        if path.suffix not in (".ipynb", ".lock"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_json_atomic(record, {"iteration": iteration})


def collect_drafts(run_dir: str | Path, iteration: int, params: Params, out: Path,
                   engines: StageEngine) -> dict[str, Any]:
    """The collection pass of the final stage: length_control.collect_queries new self-instructed queries,
    answered by the last iteration's Generator -> out/queries.jsonl, out/drafts.jsonl (resumable). Both run on
    `engines` (holding that Generator), left open for the rest of the stage."""
    from slkit.drafts import write_drafts
    from slkit.queries import synthesize_queries

    count = params.length_control.collect_queries
    if not count:
        return {}
    earlier = _earlier_queries(run_dir, iteration + 1)
    pool = _query_pool(params, earlier)
    # synthesize_queries makes queries.per_language queries in each language: here the collection's count.
    sized = params.model_copy(update={"queries": params.queries.model_copy(update={"per_language": count})})
    queries, rejected = _generate_records(
        run_dir, iteration, "length_control (collect queries)", "queries.jsonl", count * len(params.queries.languages),
        lambda engine, writer, on_done: synthesize_queries(engine, pool, [r["query"] for r in earlier], sized,
                                                           COLLECTION, writer, on_done), out=out, shared=engines)
    drafts, refused = _generate_records(
        run_dir, iteration, "length_control (collect drafts)", "drafts.jsonl",
        len(queries) * params.drafts.samples_per_query,
        lambda engine, writer, on_done: write_drafts(engine, queries, params, COLLECTION, writer, params.quality,
                                                     on_done), out=out, shared=engines)
    return {"queries": len(queries), "drafts": len(drafts), "rejected_queries": dict(rejected),
            "rejected_drafts": dict(refused)}


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
                      for r in read_jsonl(path) if lc.min_words <= r["words"] <= lc.max_words]
    return sorted(pairs, key=lambda p: p["id"])


@skip_when_done("length_control")
def length_control_stage(run_dir: str | Path, iteration: int) -> dict[str, Any]:
    """Every iteration's drafts and extensions, and the collection pass's drafts, in the word window ->
    length_control/constrained.jsonl (queries carrying a length their response meets), a final Generator
    adapter trained on them, length scores before and after. Records the iteration it ran after."""
    from slkit.engines import Request
    from slkit.length_control import (assign_constraint, names_length, rewrite_failure, rewrite_prompt, satisfies,
                                      template_rewrite)
    from slkit.training import train_adapter

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
    engines = StageEngine(with_sleep_mode(params, True), {"generator": str(last)})
    try:
        collection = collect_drafts(run_dir, iteration, params, out, engines)
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
            asked = engine.generate([Request(engine.render(rewrite_prompt(p["query"], c, p["language"], rng)), None,
                                             params.queries.max_new_tokens,
                                             stable_seed(params.seed, "rewrite", p["id"]))
                                     for p, c in zip(pairs, constraints)], params.sampling)
            for i, (p, c, text) in enumerate(zip(pairs, constraints, asked)):
                failure = rewrite_failure(p["query"], text, c)
                if failure:
                    refused[failure] += 1
                else:
                    rewrites[i], how[i] = text.strip(), "model"
    finally:
        engines.close()
    records = []
    for p, a, query, h in zip(pairs, assignments, rewrites, how):
        c = a.constraint
        if not satisfies(c, p["words"]):  # cannot happen by construction; never train on a false constraint
            raise AssertionError(f"constraint {c} is not true of {p['id']} ({p['words']} words)")
        records.append({"id": p["id"], "query": query, "original_query": p["query"], "language": p["language"],
                        "constraint": {"kind": c.kind, "low": c.low, "high": c.high}, "fallback": a.fallback,
                        "words": p["words"], "source": p["source"], "rewrite": h, "completion": p["response"]})
    write_jsonl_atomic(out / "constrained.jsonl", records)
    write_jsonl_atomic(out / "generator_sft.jsonl",
                       [{"id": r["id"], "prompt": r["query"], "completion": r["completion"]} for r in records])
    init = None if lc.fresh_adapter or not (last / "adapter_config.json").exists() else str(last)
    final = out / "adapters" / "generator"
    training = (read_json(final / "slkit-train.json") if (final / "slkit-train.json").exists()
                else train_adapter(params, out / "generator_sft.jsonl", final, init_adapter=init))
    before = read_json(iter_dir(run_dir, iteration) / "metrics.json").get("length_following")
    after = score_benchmark(with_sleep_mode(params, False), {"generator": str(final)}, out, "length_control")
    summary = {"pairs": len(records), "sources": dict(Counter(r["source"] for r in records)),
               "skipped": {"names_length": len(found) - len(pairs)}, "collection": collection,
               "kinds": dict(Counter(r["constraint"]["kind"] for r in records)),
               "fallbacks": dict(Counter(r["fallback"] for r in records if r["fallback"])),
               "rewrites": dict(Counter(how)), "model_rewrites_refused": dict(refused),
               "training": {k: v for k, v in training.items() if k != "losses"},
               "length_before": before, "length_after": after}
    write_json_atomic(out / "metrics.json", summary)
    mark_done(out, "length_control", summary, iteration=iteration)
    return summary


WORD_FILES = ("queries", "drafts", "resampled_drafts", "extensions", "resampled")


def stage_word_means(out: Path) -> dict[str, float]:
    """Mean words per record of each stage file in one iteration directory."""
    from statistics import mean

    means = {}
    for name in WORD_FILES:
        path = out / f"{name}.jsonl"
        rows = read_jsonl(path) if path.exists() else []
        if rows:
            means[name] = round(mean(r["words"] for r in rows), 1)
    return means


def length_table(run_dir: str | Path, upto: int | None = None):
    """One row per text: iteration, stage (drafts / resampled_drafts / extensions / resampled) and words, for
    plots and tables."""
    import pandas as pd

    rows = []
    k = 1
    while iter_dir(run_dir, k).exists() and (upto is None or k <= upto):
        for name in ("drafts", "resampled_drafts", "extensions", "resampled"):
            path = iter_dir(run_dir, k) / f"{name}.jsonl"
            if path.exists():
                rows += [{"iteration": k, "stage": name, "words": r["words"]} for r in read_jsonl(path)]
        k += 1
    return pd.DataFrame(rows, columns=["iteration", "stage", "words"])
