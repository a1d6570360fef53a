"""Tables of a run's results across iterations, figures of them, and several runs side by side.

    from slkit.evaluation.reports import summary_table, compare_runs
    summary_table(["runs/a", "runs/b"])            # one row per run and iteration
    compare_runs(["runs/a", "runs/b"], "runs/compare")   # same tables and figures, runs side by side
    write_output_figures("out")                    # the benchmark figures of one directory (`slkit evaluate`)

Metric definitions (also in the README's "Evaluation" section):
- length score: the benchmark's own, per output (LonGen in [0, 1], LongBench-Write's S_l in [0, 100]);
  means per constraint type, length bin and language.
- length stability: per query, coefficient of variation (population sd / mean) of produced words over
  its samples; mean over queries.
- judge: mean 1-10 score per dimension over the responses the judge scored; failed = replies that
  held no valid JSON after every try.
- filter rate: a check's rejections (or the accepted share) over the candidates that stage examined.
- distinct-n: distinct n-grams / all n-grams over a stage's texts (words for English, characters
  for Chinese); falling values mean more repetition.
- capped share: the outputs that max_new_tokens cut (the cap set their length, not the model) over
  the outputs generated.
"""
from __future__ import annotations

from pathlib import Path
from statistics import mean, median
from typing import Any

import pandas as pd
from IPython.display import Image, display

from slkit.core.layout import BASELINE, environment_path, iter_dir, stage_summary
from slkit.core.records import read_document, read_json, read_records
from slkit.core.schema import BenchmarkOutput, EvaluationSummary, micro_iteration_verdict_counts, record_type
from slkit.evaluation.benchmarks import length_stability
from slkit.evaluation.figures import (
    plot_distinct,
    plot_filter_rates,
    plot_length_scores,
    plot_length_stability,
    plot_lengths,
    plot_required_vs_produced,
)
from slkit.method.textstats import distinct_n, ngram_units


def iterations(run_dir: str | Path, upto: int | None = None) -> list[int]:
    """Iterations of a run that have a directory, in order; 0 is the base model's evaluation (baseline/)."""
    found = [BASELINE] if iter_dir(run_dir, BASELINE).exists() else []
    k = 1
    while iter_dir(run_dir, k).exists() and (upto is None or k <= upto):
        found.append(k)
        k += 1
    return found


def iteration_dirs(run_dir: str | Path, upto: int | None = None) -> dict[int, Path]:
    return {k: iter_dir(run_dir, k) for k in iterations(run_dir, upto)}


def benchmark_table(run_dir: str | Path, upto: int | None = None, dirs: dict[int, Path] | None = None):
    """One row per benchmark output: iteration, index, sample, type, bin, language, required, words, score;
    from the run's iterations, or from `dirs` (iteration -> directory)."""
    columns = ["iteration", "index", "sample", "type", "bin", "language", "required", "words", "score"]
    rows = []
    for k, directory in (iteration_dirs(run_dir, upto) if dirs is None else dirs).items():
        path = directory / "benchmark_outputs.jsonl"
        if path.exists():
            rows += [{"iteration": k, **{c: r[c] for c in columns[1:]}} for r in read_records(path, BenchmarkOutput)]
    return pd.DataFrame(rows, columns=columns)


def stability_table(benchmark):
    """One row per query with 2+ samples: iteration, index, type, cv (evaluation.length_stability of
    each iteration's rows of a benchmark_table)."""
    rows = []
    for k, part in benchmark.groupby("iteration"):
        records = part.to_dict("records")
        types = {r["index"]: r["type"] for r in records}
        per_query = (length_stability(records) or {}).get("per_query", {})
        rows += [{"iteration": k, "index": i, "type": types[i], "cv": cv} for i, cv in per_query.items()]
    return pd.DataFrame(rows, columns=["iteration", "index", "type", "cv"])


def filter_table(run_dir: str | Path, upto: int | None = None):
    """Per iteration, what each check did to the candidates its stage examined: stage, check, count,
    out_of, rate ("accepted" rows give the share that passed)."""
    rows: list[dict[str, Any]] = []

    def add(k, stage, check, count, out_of):
        if out_of:
            rows.append({"iteration": k, "stage": stage, "check": check, "count": count, "out_of": out_of,
                         "rate": round(count / out_of, 4)})

    for k in iterations(run_dir, upto):
        for stage, accepted_key in (("queries", "queries"), ("drafts", "drafts")):
            summary = stage_summary(run_dir, k, stage)
            if not summary:
                continue
            rejected = {r: n for r, n in summary.get("rejected", {}).items() if r != "gave_up"}
            candidates = summary[accepted_key] + sum(rejected.values())
            add(k, stage, "accepted", summary[accepted_key], candidates)
            for reason, n in sorted(rejected.items()):
                add(k, stage, f"rejected: {reason}", n, candidates)
        extend = stage_summary(run_dir, k, "extensions")
        verdicts = micro_iteration_verdict_counts(extend.get("counts", {}))
        for reason, n in sorted(verdicts.items()):
            add(k, "extension micro-iteration", reason.replace("_", " ", 1), n, sum(verdicts.values()))
        if extend:
            add(k, "draft resampling", "kept", extend["resampled_drafts"], extend["drafts"])
            add(k, "extension job", "accepted", extend["extensions"], extend["jobs"])
        train = stage_summary(run_dir, k, "training")
        if train:
            add(k, "extension resampling", "kept", train["resampled_extensions"], train["extensions"])
    return pd.DataFrame(rows, columns=["iteration", "stage", "check", "count", "out_of", "rate"])


def distinct_table(run_dir: str | Path, upto: int | None = None, ns: tuple[int, ...] = (2, 3),
                   dirs: dict[int, Path] | None = None):
    """Distinct-n of each stage's texts per iteration and language: repetition drift; from the run's
    iterations, or from `dirs` (iteration -> directory)."""
    sources = {"drafts": ("drafts", "draft"), "extensions": ("extensions", "extended"),
               "benchmark": ("benchmark_outputs", "output")}
    rows = []
    for k, directory in (iteration_dirs(run_dir, upto) if dirs is None else dirs).items():
        for stage, (name, field) in sources.items():
            path = directory / f"{name}.jsonl"
            if not path.exists():
                continue
            records = read_records(path, record_type(path))
            for language in sorted({r["language"] for r in records}):
                texts = [r[field] for r in records if r["language"] == language]
                for n in ns:
                    rows.append({"iteration": k, "stage": stage, "language": language, "n": n,
                                 "texts": len(texts), "distinct": round(distinct_n(texts, n, language), 4)})
    return pd.DataFrame(rows, columns=["iteration", "stage", "language", "n", "texts", "distinct"])


def summary_table(run_dirs: list[str | Path]):
    """One row per run and iteration: length score (overall and per type), stability, judge, words per stage."""
    rows = []
    for run_dir in run_dirs:
        name = Path(run_dir).name
        for k in iterations(run_dir):
            path = iter_dir(run_dir, k) / "evaluation.json"
            if not path.exists():
                continue
            m = read_document(path, EvaluationSummary)
            lf = m["length_following"] or {}
            judge = m["judge"] or {}
            row = {"run": name, "iteration": k, "benchmark": lf.get("benchmark"), "length score": lf.get("overall"),
                   **{f"score {t}": v for t, v in (lf.get("per_type") or {}).items()},
                   "stability CV": (lf.get("stability") or {}).get("overall_cv"),
                   "capped share": (lf.get("capped") or {}).get("share"),
                   "judge": judge.get("overall"), "judge failed": judge.get("failed"),
                   **{f"words {s}": v for s, v in m.get("words", {}).items()}}
            rows.append(row)
    return pd.DataFrame(rows)


def environment_table(run_dirs: list[str | Path]):
    """One row per run: what it ran on (its environment.json): python, the packages, CUDA, GPUs, slkit's commit
    ("+modified" when tracked files differed from it). A run started before slkit recorded it has blanks."""
    rows = []
    for run_dir in run_dirs:
        path = environment_path(run_dir)
        env = read_json(path) if path.exists() else {}
        git = (env.get("slkit") or {}).get("git") or {}
        rows.append({"run": Path(run_dir).name, "python": env.get("python"),
                     **{name: (env.get("packages") or {}).get(name) for name in
                        ("torch", "transformers", "peft", "vllm", "bitsandbytes")},
                     "cuda": env.get("cuda"), "gpus": ", ".join(g["name"] for g in env.get("gpus", [])) or None,
                     "slkit": (git["commit"][:10] + ("+modified" if git["modified"] else "")) if git
                     else (env.get("slkit") or {}).get("version")})
    return pd.DataFrame(rows)


def show_figure(directory: str | Path, name: str) -> None:
    """Display a saved figure in a notebook, or say that there is none yet."""
    path = Path(directory) / name
    if path.exists():
        display(Image(filename=str(path)))
    else:
        print(f"{name}: no data yet")


def markdown_table(table) -> str:
    """A DataFrame as a GitHub markdown table (numbers to 4 significant digits, blanks for missing)."""
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _figures(tables: dict[str, Any], out: Path, scale: float) -> list[str]:
    written = [plot_lengths(tables["lengths"], out / "lengths.png")] if "lengths" in tables else []
    if len(tables["benchmark"]):
        written.append(plot_required_vs_produced(tables["benchmark"], out / "required_vs_produced.png"))
        written.append(plot_length_scores(tables["benchmark"], out / "length_scores.png", scale))
    if len(tables["stability"]):
        written.append(plot_length_stability(tables["stability"], out / "length_stability.png"))
    if "filters" in tables and len(tables["filters"]):
        written.append(plot_filter_rates(tables["filters"], out / "filter_rates.png"))
    if len(tables["distinct"]):
        written.append(plot_distinct(tables["distinct"], out / "distinct_n.png"))
    return [p.name for p in written]


def run_tables(run_dir: str | Path, upto: int | None = None) -> dict[str, Any]:
    benchmark = benchmark_table(run_dir, upto)
    return {"lengths": length_table(run_dir, upto), "benchmark": benchmark, "stability": stability_table(benchmark),
            "filters": filter_table(run_dir, upto), "distinct": distinct_table(run_dir, upto)}


def output_tables(out: str | Path) -> dict[str, Any]:
    """The benchmark tables of one directory that is no run (`slkit evaluate`'s), as iteration 0."""
    dirs = {0: Path(out)}
    benchmark = benchmark_table(out, dirs=dirs)
    return {"benchmark": benchmark, "stability": stability_table(benchmark), "distinct": distinct_table(out, dirs=dirs)}


def write_output_figures(out: str | Path, scale: float) -> list[str]:
    """The evaluation stage's benchmark figures (required vs produced, length scores, stability, distinct-n) of
    the outputs in `out`, written there; `scale` is the benchmark's perfect length score."""
    return _figures(output_tables(out), Path(out), scale)


def _scale(run_dir: str | Path) -> float:
    """The perfect length score of a run's benchmark, from its latest metrics."""
    for k in reversed(iterations(run_dir)):
        path = iter_dir(run_dir, k) / "evaluation.json"
        if path.exists():
            return (read_document(path, EvaluationSummary)["length_following"] or {}).get("max_score", 1.0)
    return 1.0


def write_iteration_figures(run_dir: str | Path, iteration: int, scale: float) -> list[str]:
    """The evaluate notebook's figures for iterations 1..iteration, written into that iteration's directory;
    `scale` is the benchmark's perfect length score."""
    return _figures(run_tables(run_dir, iteration), iter_dir(run_dir, iteration), scale)


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Several runs side by side: summary.md / summary.csv and the same figures with one panel per run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(r).name for r in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs to compare need distinct directory names, got {names}")
    per_run = [run_tables(r) for r in run_dirs]
    tables = {key: pd.concat([t[key].assign(run=name) for t, name in zip(per_run, names)], ignore_index=True)
              for key in per_run[0]}
    summary = summary_table(run_dirs)
    summary.to_csv(out / "summary.csv", index=False)
    environment = environment_table(run_dirs)
    (out / "summary.md").write_text(markdown_table(summary) + "\n## Environment\n\n" + markdown_table(environment),
                                    encoding="utf-8")
    figures = _figures(tables, out, max(_scale(r) for r in run_dirs))
    return {"summary": summary, "environment": environment, "figures": figures, "out": out}


WORD_FILES = ("queries", "drafts", "resampled_drafts", "extensions", "resampled_extensions")


def stage_word_means(out: Path) -> dict[str, float]:
    """Mean words per record of each stage file in one iteration directory."""

    means = {}
    for name in WORD_FILES:
        path = out / f"{name}.jsonl"
        rows = read_records(path, record_type(path)) if path.exists() else []
        if rows:
            means[name] = round(mean(r["words"] for r in rows), 1)
    return means


def length_table(run_dir: str | Path, upto: int | None = None):
    """One row per text: iteration, stage (drafts / resampled_drafts / extensions / resampled_extensions) and words, for
    plots and tables."""
    rows = []
    k = 1
    while iter_dir(run_dir, k).exists() and (upto is None or k <= upto):
        for name in ("drafts", "resampled_drafts", "extensions", "resampled_extensions"):
            path = iter_dir(run_dir, k) / f"{name}.jsonl"
            if path.exists():
                rows += [{"iteration": k, "stage": name, "words": r["words"]}
                         for r in read_records(path, record_type(path))]
        k += 1
    return pd.DataFrame(rows, columns=["iteration", "stage", "words"])


def evaluation_report(metrics: dict[str, Any]) -> str:
    """A short markdown report of one evaluation (`slkit evaluate`'s evaluation.json): what was scored, its
    length scores, stability, the share of outputs max_new_tokens cut, the judge, and the figures."""
    lf, judge = metrics.get("length_following") or {}, metrics.get("judge") or {}
    lines = [f"# Evaluation of {metrics['model']}", ""]
    lines += [f"- {key}: `{metrics[key]}`" for key in ("adapter", "endpoint", "judge_model", "judge_endpoint")
              if metrics.get(key)]
    if lf:
        lines += [f"- benchmark: `{lf['benchmark']}` ({lf['format']}), {lf['n']} outputs", "",
                  "## Length following", "",
                  f"Length score (0-{lf['max_score']:g}, the benchmark's own): **{lf['overall']:.4g}**", ""]
        for name, key in (("type", "per_type"), ("length bin", "per_length_bin"), ("language", "per_language")):
            if lf.get(key):
                lines += [f"| {name} | score |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in lf[key].items()] + [""]
        if lf.get("stability"):
            lines += [f"Length stability: mean coefficient of variation {lf['stability']['overall_cv']:.4g} over "
                      f"{lf['stability']['queries']} queries x {lf['stability']['samples_per_query']} samples "
                      "(lower is steadier).", ""]
        capped = lf.get("capped") or {}
        if capped.get("outputs"):
            lines += [f"Cut by max_new_tokens: {capped['cut']} of {capped['outputs']} outputs ({capped['share']:.1%}); "
                      "their length is the cap's, not the model's: raise max_new_tokens to measure it.", ""]
    if judge:
        overall = "none judged" if judge["overall"] is None else f"mean {judge['overall']:.3g} of 10"
        lines += ["## Judge", "", f"{overall}; {judge['judged']} judged, {judge['failed']} failed (no valid JSON).", ""]
        if judge["per_dimension"]:
            lines += ["| dimension | score |", "|---|---|"] + [f"| {d} | {v:.3g} |"
                                                                for d, v in judge["per_dimension"].items()] + [""]
    if metrics.get("figures"):
        lines += ["## Figures", ""] + [f"![{name}]({name})" for name in metrics["figures"]] + [""]
    return "\n".join(lines)


# Length-matched repetition and the lengths of answers the model ended itself (the growth report, issue 25).

# The prefix per-text distinct-n is measured on, in n-gram units (textstats.ngram_units): the first 300 English
# words or 600 Chinese units (characters). Pooled distinct-n falls with length by itself (a longer text repeats
# more function words); prefixes of one length compare texts of different lengths fairly.
PREFIX_UNITS = {"en": 300, "zh": 600}


def text_prefix(text: str, language: str, units: int) -> str | None:
    """The first `units` n-gram units of `text` (words in English, characters in Chinese: textstats.ngram_units)
    as text that splits into exactly those units; None when the text is shorter."""
    parts = ngram_units(text, language)
    if len(parts) < units:
        return None
    return " ".join(parts[:units]) if language != "zh" else "".join(parts[:units])


def prefix_distinct(texts: list[str], n: int, language: str, units: int | None = None) -> dict[str, Any]:
    """Per-text distinct-n on length-matched prefixes: each text's first `units` units (PREFIX_UNITS of the
    language by default) scored alone with textstats.distinct_n; texts shorter than the prefix are left out.
    Returns mean and median over the texts measured (None when none is long enough), "texts" measured and
    "of" texts given."""
    units = PREFIX_UNITS.get(language, PREFIX_UNITS["en"]) if units is None else units
    prefixes = [p for p in (text_prefix(t, language, units) for t in texts) if p is not None]
    values = [distinct_n([p], n, language) for p in prefixes]
    return {"mean": round(mean(values), 4) if values else None, "median": round(median(values), 4) if values else None,
            "texts": len(values), "of": len(texts), "units": units}


def finished_lengths(outputs: list[dict]) -> dict[str, dict[str, Any]]:
    """Words of the benchmark answers the model ended itself (not cut by max_new_tokens), per language and "all":
    outputs, cut (None where no record says), finished, median and mean words of the finished ones, and the cut
    share (cut / outputs that record it). An output whose "cut" is None (written before slkit recorded it)
    counts as finished, and "cut_recorded" says how many outputs record it."""
    groups: dict[str, list[dict]] = {"all": list(outputs)}
    for r in outputs:
        groups.setdefault(r["language"], []).append(r)
    table = {}
    for language in ["all"] + sorted(k for k in groups if k != "all"):
        rows = groups[language]
        recorded = [r for r in rows if r.get("cut") is not None]
        cut = sum(1 for r in recorded if r["cut"])
        words = [r["words"] for r in rows if not r.get("cut")]
        table[language] = {"outputs": len(rows), "cut_recorded": len(recorded), "cut": cut if recorded else None,
                           "cut_share": round(cut / len(recorded), 4) if recorded else None,
                           "finished": len(words), "median": median(words) if words else None,
                           "mean": round(mean(words), 1) if words else None}
    return table
