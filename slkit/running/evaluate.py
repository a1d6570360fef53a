"""`slkit evaluate`: score any model, LoRA adapter or OpenAI-compatible endpoint on a length benchmark, without a run.

    slkit evaluate --model Qwen/Qwen2.5-7B-Instruct --benchmark builtin:lengths-mini --out runs/eval-7b
    slkit evaluate --model Qwen/Qwen2.5-7B-Instruct --endpoint http://gpu1:8000/v1 --out runs/eval-served
    slkit evaluate --model Qwen/Qwen2.5-7B-Instruct --adapter runs/x/iter_3/adapters/generator \\
        --recipe params/qwen2.5-7b-24gb.yaml --judge-endpoint http://judge:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct \\
        --out runs/eval-x3

--out gets what the evaluation stage writes into an iteration, from the same functions
(slkit.stages.evaluation.evaluate_model): benchmark_outputs.jsonl, judgements.jsonl, evaluation.json and the
benchmark figures, plus report.md. Sampling, engine and evaluation settings come from --recipe (or the
defaults: the reference's sampling), the flags override them; evaluate.yaml records the params it ran with. The
same command again resumes from the outputs written; one with other params is refused.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slkit.core.params import Params, ParamsError, apply_overrides, dump_params, load_params, params_from_dict
from slkit.core.records import RecordFileError, write_json_atomic
from slkit.core.schema import ModelEvaluation
from slkit.engines.server import managed_server
from slkit.evaluation.benchmarks import locate_benchmark
from slkit.evaluation.reports import evaluation_report, write_output_figures
from slkit.running.pipeline import ProgressPoller, changes_since
from slkit.stages.evaluation import evaluate_model

PARAMS_FILE = "evaluate.yaml"

# An endpoint named on the command line may be any OpenAI-compatible server: its chat API applies the served
# model's own template (no local tokenizer needed), and only the standard OpenAI fields are sent.
SERVED = {"api": "chat", "adapters": "none", "vllm_sampling": False}


def evaluation_params(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Params:
    """The params of one evaluation: the recipe's (or the defaults), with the command line's choices."""
    data = load_params(args.recipe).to_dict() if args.recipe else {"model": {}}
    out = Path(args.out).resolve()
    data.update(run_name=out.name, output_dir=str(out.parent))  # run_dir is --out: engine logs land there too
    data["model"]["path"] = args.model
    ev = data.setdefault("evaluation", {})
    try:
        if args.benchmark or ev.get("benchmark"):
            ev["benchmark"] = locate_benchmark(args.benchmark or ev["benchmark"], Path.cwd())
    except RecordFileError as err:
        raise ParamsError(f"--benchmark: {err}") from None
    for key, value in (("samples_per_query", args.samples), ("subset_size", args.subset),
                       ("max_new_tokens", args.max_new_tokens)):
        if value is not None:
            ev[key] = value
    judge = ev.setdefault("judge", {})
    judge["enabled"] = not args.no_judge
    if args.judge_model:
        judge["model"] = {**(data["model"] if args.judge_endpoint else {}), "path": args.judge_model}
    if args.judge_endpoint:
        judge["engine"] = {"backend": "openai", "endpoint": {**SERVED, "base_urls": [args.judge_endpoint]}}
    if args.endpoint:
        engine = data.setdefault("engine", {})
        endpoint = engine.get("endpoint", {}) if engine.get("backend") == "openai" else dict(SERVED)
        engine.update(backend="openai", endpoint={**endpoint, "base_urls": [args.endpoint]})
    apply_overrides(data, overrides or {})
    return params_from_dict(data, "slkit evaluate", overridden=tuple(overrides or {}))


def _hold_params(params: Params, out: Path) -> None:
    """Write out/evaluate.yaml, or refuse when out holds an evaluation with other params."""
    saved = out / PARAMS_FILE
    if saved.exists():
        _, changed = changes_since(saved, params)
        if changed:
            raise ParamsError(f"{out} holds an evaluation with other params ({', '.join(changed)} differ); "
                              f"resuming would mix results: use another --out or delete {out}")
    dump_params(params, saved)


def run_evaluation(params: Params, adapter: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Score params.model (with `adapter` as its Generator, or on params' endpoint) on params.evaluation's
    benchmark into params.run_dir; returns the metrics written to evaluation.json."""
    out = params.run_dir
    adapters = {}
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ParamsError(f"--adapter: {adapter} holds no adapter_config.json: not a LoRA adapter directory")
        adapters = {"generator": str(Path(adapter).resolve())}
    if not params.evaluation.benchmark:
        raise ParamsError("--benchmark: no benchmark to score (the recipe's evaluation.benchmark is empty)")
    out.mkdir(parents=True, exist_ok=True)
    _hold_params(params, out)
    ep, jp = params.engine.endpoint, params.evaluation.judge
    metrics: dict[str, Any] = {
        "model": params.model.path, "adapter": adapters.get("generator"),
        "endpoint": ep.base_urls[0] if params.engine.backend == "openai" else None,
        "judge_model": (jp.model or params.model).path if jp.enabled else None,
        "judge_endpoint": jp.engine.endpoint.base_urls[0] if jp.enabled and jp.engine and jp.engine.backend == "openai"
        else None}
    # engine.backend vllm: one managed `vllm serve` for the evaluation (answers and judge), stopped at its end.
    with managed_server(params, out), tqdm(total=0, disable=not show_progress) as bar, ProgressPoller(out, bar):
        metrics.update(evaluate_model(params, adapters, out, "evaluate"))
    metrics["figures"] = write_output_figures(out, metrics["length_following"]["max_score"])
    document = ModelEvaluation(**metrics)
    write_json_atomic(out / "evaluation.json", document)
    metrics = document.model_dump()
    (out / "report.md").write_text(evaluation_report(metrics), encoding="utf-8")
    return metrics
