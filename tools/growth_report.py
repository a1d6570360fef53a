"""Publish a growth run (finished or partial) as a folder of docs/results (issue 25).

    python tools/growth_report.py RUN_DIR OUT_DIR [--replace]
    python tools/growth_report.py runs/growth-qwen2.5-1.5b docs/results/growth-qwen2.5-1.5b --replace

OUT_DIR gets, for each of baseline/, iter_<k>/ and length_control/ the run has: its metrics file (evaluation.json,
or length_control.json), its stages' summaries (*.done.json), its benchmark answers as benchmark_outputs.jsonl.gz
and the figures the run wrote (*.png); beside them the run's params.yaml, slkit.log, engine_timings.jsonl and
environment.json (those the run has), growth.png, excerpts.md and README.md (slkit.evaluation.growth: every number
from the run's files). Nothing else is copied: no adapters, checkpoints, training sets (*_sft.jsonl) or notebooks.
A partial run publishes what it has, and README.md says what is missing.

An OUT_DIR that exists and is not empty is replaced only with --replace.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

from slkit.evaluation.figures import plot_growth
from slkit.evaluation.growth import excerpts_markdown, growth_report, readme_markdown

TOP_FILES = ("params.yaml", "slkit.log", "engine_timings.jsonl", "environment.json")


def gzip_copy(source: Path, dest: Path) -> None:
    """source -> dest gzipped, byte-for-byte the same for the same input (no name or time in the header)."""
    with open(source, "rb") as src, open(dest, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        shutil.copyfileobj(src, out)


def publish_column(directory: Path, metrics_file: str, dest: Path) -> list[str]:
    """One column's files into dest; returns their names, in the order the README lists them."""
    dest.mkdir(parents=True)
    names = []
    for name in [metrics_file] + sorted(p.name for p in directory.glob("*.done.json")):
        if (directory / name).is_file() and name not in names:
            shutil.copy2(directory / name, dest / name)
            names.append(name)
    if (directory / "benchmark_outputs.jsonl").is_file():
        gzip_copy(directory / "benchmark_outputs.jsonl", dest / "benchmark_outputs.jsonl.gz")
        names.append("benchmark_outputs.jsonl.gz")
    for figure in sorted(directory.glob("*.png")):
        shutil.copy2(figure, dest / figure.name)
        names.append(figure.name)
    return names


def prepare_out(run_dir: Path, out: Path, replace: bool) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run.is_relative_to(target) or target.is_relative_to(run):
        sys.exit(f"{out}: must be outside the run directory {run_dir}, and not hold it")
    if out.exists() and any(out.iterdir()):
        if not replace:
            sys.exit(f"{out}: exists and is not empty; --replace replaces it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def publish(run_dir: str | Path, out_dir: str | Path, replace: bool = False):
    """Write the published folder; returns the report (slkit.evaluation.growth.GrowthReport)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "params.yaml").exists() and not (run_dir / "baseline").is_dir():
        sys.exit(f"{run_dir}: not a run directory (no params.yaml, no baseline/)")
    report = growth_report(run_dir)  # read everything before OUT_DIR is touched
    prepare_out(run_dir, out, replace)
    published = {c.name: publish_column(c.directory, c.metrics_file, out / c.name) for c in report.columns}
    top = []
    for name in TOP_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
            top.append(name)
    growth = report.growth_table()
    if len(growth):
        plot_growth(growth, out / "growth.png")
        top.append("growth.png")
    (out / "excerpts.md").write_text(excerpts_markdown(report), encoding="utf-8")
    top.append("excerpts.md")
    (out / "README.md").write_text(readme_markdown(report, published, top), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run directory (runs/<run>, or one unpacked from a tarball)")
    parser.add_argument("out_dir", help="the folder to publish into, e.g. docs/results/growth-qwen2.5-1.5b")
    parser.add_argument("--replace", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    args = parser.parse_args(argv)
    report = publish(args.run_dir, args.out_dir, args.replace)
    print(f"published {args.run_dir} -> {args.out_dir}: {', '.join(c.name for c in report.columns) or 'no stages'}")
    for line in report.missing:
        print(f"missing: {line}")
    print()
    print(report.table_markdown())
    print(report.targets_markdown())


if __name__ == "__main__":
    main()
