"""The evaluation stage: this iteration's Generator answers the benchmark (length scores, stability), the
judge scores the answers -> benchmark_outputs.jsonl, judgements.jsonl, evaluation.json and the figures.
score_benchmark also scores the final stage's adapter; evaluate_model is what the stage and `slkit evaluate`
(slkit.running.evaluate: any model, adapter or endpoint, without a run) both run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from slkit.core.layout import BASELINE, ROLES, adapter_dir, iter_dir
from slkit.core.params import Params
from slkit.core.records import Progress, RecordWriter, mark_done, read_records, write_json_atomic
from slkit.core.schema import BenchmarkOutput, EvaluationSummary
from slkit.engines import Request, stable_seed
from slkit.engines.base import share
from slkit.evaluation.benchmarks import (
    SCALES,
    length_stability,
    load_benchmark,
    output_lengths,
    score_length,
    stratified_subset,
    summarize_scores,
)
from slkit.evaluation.judge import judge_responses, summarize_judgements
from slkit.evaluation.reports import WORD_FILES, stage_word_means, write_iteration_figures
from slkit.stages.common import StageEngine, WatchedEngine, skip_when_done, stage_engine


def score_benchmark(params: Params, adapters: dict[str, str | None], out: Path, stage: str,
                    shared: StageEngine | None = None) -> dict[str, Any] | None:
    """The Generator answers the benchmark subset, evaluation.samples_per_query times each ->
    out/benchmark_outputs.jsonl (resumable); returns length scores, length stability and the share of outputs
    max_new_tokens cut ("capped": their length was the cap's, not the model's). With `shared`, its engine
    (holding `adapters`) is used and left open for the rest of the stage."""
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
                engine = WatchedEngine(engine, progress)
                texts = engine.generate([Request(engine.render(subset[i]["query"]), "generator", max_new,
                                                 stable_seed(params.seed, "benchmark", i, k)) for i, k in todo],
                                        params.sampling, progress.advance)
            for (i, k), text in zip(todo, texts):
                item, lengths = subset[i], output_lengths(text, fmt)
                writer.write(BenchmarkOutput(
                    index=i, sample=k, query=item["query"], language=item["language"], type=item["type"],
                    bin=item["bin"], required=item["required"],
                    interval=list(item["interval"]) if "interval" in item else None,
                    **lengths, score=score_length(item, lengths["words"], fmt), cut=bool(getattr(text, "cut", False)),
                    output=text))
        scored = sorted(writer.finish(), key=lambda r: (r["index"], r["sample"]))
    return {"benchmark": Path(ev.benchmark).name if Path(ev.benchmark).exists() else ev.benchmark, "format": fmt,
            "max_score": SCALES[fmt], **summarize_scores(scored), "stability": length_stability(scored),
            "capped": capped_share(scored)}


def capped_share(scored: list[dict]) -> dict[str, Any]:
    """How many benchmark outputs max_new_tokens cut, of those that record it (records written before slkit
    recorded "cut" do not)."""
    known = [r["cut"] for r in scored if r.get("cut") is not None]
    return {"outputs": len(known), "cut": sum(known), "share": share(sum(known), len(known))}


def judge_stage_outputs(params: Params, out: Path, stage: str, shared: StageEngine | None = None) -> dict[str, Any] | None:
    """The judge scores the benchmark outputs of this stage -> out/judgements.jsonl; returns the summary.
    A judge that is the run's own model on the run's engine (judge.model and judge.engine unset) uses
    `shared`'s engine as the base model, instead of starting a second one."""
    jp = params.evaluation.judge
    outputs = out / "benchmark_outputs.jsonl"
    if not jp.enabled or not outputs.exists():
        return None
    items = [r for r in read_records(outputs, BenchmarkOutput) if r["sample"] < jp.samples_per_query]
    with RecordWriter(out / "judgements.jsonl") as writer:
        if len(writer.records) < len(items):
            own = jp.model is None and jp.engine is None
            judge_params = params.model_copy(update={"model": jp.model or params.model,
                                                     "engine": jp.engine or params.engine})
            progress = Progress(out, f"{stage} (judge)", len(items), len(writer.records))
            with stage_engine(shared if own else None, judge_params, {}) as engine:
                judge_responses(WatchedEngine(engine, progress), items, jp, params.seed, writer, progress.advance)
        return summarize_judgements(writer.finish())


def evaluate_model(params: Params, adapters: dict[str, str | None], out: Path, stage: str) -> dict[str, Any]:
    """The model of `params` with `adapters` answers the benchmark and the judge scores the answers, on one engine
    -> out/benchmark_outputs.jsonl, out/judgements.jsonl; returns {"length_following", "judge"} (each where
    there is one)."""
    with StageEngine(params, adapters) as engines:
        scores = score_benchmark(params, adapters, out, stage, engines)
        judged = judge_stage_outputs(params, out, stage, engines)
    return {**({"length_following": scores} if scores else {}), **({"judge": judged} if judged else {})}


@skip_when_done("evaluation")
def evaluation_stage(run_dir: str | Path, iteration: int, params: Params) -> dict[str, Any]:
    """Benchmark with this iteration's Generator (length scores, stability, judge) -> benchmark_outputs.jsonl,
    judgements.jsonl, evaluation.json and the figures of slkit.evaluation.figures. Iteration 0 (BASELINE) evaluates the
    untrained base model with the same subset, samples and seeds, into runs/<run>/baseline/."""
    out = iter_dir(run_dir, iteration)
    adapters = {} if iteration == BASELINE else {role: str(adapter_dir(run_dir, iteration, role)) for role in ROLES}
    evaluated = evaluate_model(params, adapters, out, "evaluation")
    counts = {name: sum(1 for _ in open(out / f"{name}.jsonl", encoding="utf-8"))
              for name in WORD_FILES if (out / f"{name}.jsonl").exists()}
    scores = evaluated.get("length_following")
    figures = write_iteration_figures(run_dir, iteration, (scores or {}).get("max_score", 1.0))
    metrics = EvaluationSummary(iteration=iteration, run=params.run_name, length_following=scores,
                                judge=evaluated.get("judge"), words=stage_word_means(out), counts=counts,
                                figures=figures).model_dump()
    write_json_atomic(out / "evaluation.json", metrics)
    mark_done(out, "evaluation", metrics)
    return metrics
