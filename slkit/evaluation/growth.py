"""The growth report of a run: what the loop did to the model, iteration by iteration (issue 25).

    from slkit.evaluation.growth import growth_report
    report = growth_report("runs/growth-qwen2.5-1.5b")
    report.markdown()            # the README's table, the targets and what is missing
    report.growth_table()        # finished median words per column and language, drafts' and extensions'

One column per stage that evaluates the Generator: baseline/, iter_<k>/, length_control/. Every number is read
from the run's files (benchmark_outputs.jsonl, the stages' done-markers, extensions.jsonl, drafts.jsonl,
length_control.json, slkit.log, engine_timings.jsonl) with slkit's readers, and computed with slkit's metric
functions (benchmarks.summarize_scores, length_stability; reports.finished_lengths, prefix_distinct,
filter_table; textstats.distinct_n).

Targets (issue 25, item 5), the last macro-iteration against the baseline: finished median words at least 3x in
both languages (2x at the least), LonGen score at least 5x, the share cut at the cap no higher, per-text
distinct-4 on length-matched prefixes at least 0.9x.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median
from typing import Any

import pandas as pd
import yaml

from slkit.core.layout import BASELINE, iter_dir, stage_done, stage_summary
from slkit.core.logs import stage_runs
from slkit.core.records import RecordFileError, checked, read_document, read_records
from slkit.core.schema import (
    BenchmarkOutput,
    DraftRecord,
    EngineTiming,
    EvaluationSummary,
    ExtensionRecord,
    LengthControlSummary,
)
from slkit.evaluation.benchmarks import length_stability, summarize_scores
from slkit.evaluation.reports import PREFIX_UNITS, filter_table, finished_lengths, prefix_distinct
from slkit.method.textstats import distinct_n

LANGUAGES = ("en", "zh")
DISTINCT_N = 4
LOOP_STAGES = ("queries", "drafts", "extensions", "training", "evaluation")
LENGTH_CONTROL = "length_control"
# (what is compared, the goal's factor, the least factor that still counts, higher is better)
WORDS_TARGET, WORDS_LEAST = 3.0, 2.0
SCORE_TARGET = 5.0
DISTINCT_TARGET = 0.9


@dataclass
class Column:
    """One evaluated stage of the run: baseline (iteration 0), iter_<k>, or the final length-control stage."""
    name: str
    iteration: int
    directory: Path
    metrics_file: str  # evaluation.json, or length_control.json
    outputs: list[dict] = field(default_factory=list)  # benchmark_outputs.jsonl, checked as BenchmarkOutput
    numbers: dict[str, Any] = field(default_factory=dict)

    @property
    def is_loop(self) -> bool:
        return self.name.startswith("iter_")


def run_params(run_dir: str | Path) -> dict[str, Any]:
    """The run's params.yaml as written (a dict): what the run was asked to do. Read as YAML, not validated, so a
    run from another slkit version still reports; {} without one."""
    path = Path(run_dir) / "params.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.exists() else {}


def expected_columns(params: dict[str, Any]) -> list[str]:
    """The columns a finished run of these params has: baseline (unless evaluation.baseline is false),
    iter_1..iter_N, length_control (when length_control.enabled)."""
    names = ["baseline"] if (params.get("evaluation") or {}).get("baseline", True) else []
    names += [f"iter_{k}" for k in range(1, int(params.get("macro_iterations", 3)) + 1)]
    return names + ([LENGTH_CONTROL] if (params.get("length_control") or {}).get("enabled", True) else [])


def found_columns(run_dir: str | Path) -> list[Column]:
    """The columns whose directory exists, in the loop's order (iterations until the first gap)."""
    run_dir = Path(run_dir)
    columns = []
    if iter_dir(run_dir, BASELINE).is_dir():
        columns.append(Column("baseline", BASELINE, iter_dir(run_dir, BASELINE), "evaluation.json"))
    k = 1
    while iter_dir(run_dir, k).is_dir():
        columns.append(Column(f"iter_{k}", k, iter_dir(run_dir, k), "evaluation.json"))
        k += 1
    if (run_dir / LENGTH_CONTROL).is_dir():
        marker = run_dir / LENGTH_CONTROL / f"{LENGTH_CONTROL}.done.json"
        after = json.loads(marker.read_text(encoding="utf-8")).get("iteration") if marker.exists() else None
        columns.append(Column(LENGTH_CONTROL, after if after is not None else k - 1, run_dir / LENGTH_CONTROL,
                              "length_control.json"))
    for column in columns:
        path = column.directory / "benchmark_outputs.jsonl"
        column.outputs = read_records(path, BenchmarkOutput) if path.exists() else []
    return columns


def missing_parts(run_dir: str | Path, params: dict[str, Any], columns: list[Column]) -> list[str]:
    """What a finished run of `params` has that this one lacks, one line each ([] when it is whole)."""
    found = {c.name: c for c in columns}
    missing = []
    for name in expected_columns(params):
        column = found.get(name)
        if column is None:
            missing.append(f"{name}/: not in the run directory")
            continue
        if column.is_loop:
            undone = [s for s in LOOP_STAGES if not stage_done(run_dir, column.iteration, s)]
            if undone:
                missing.append(f"{name}/: stage(s) not finished: {', '.join(undone)}")
        elif name == "baseline" and not stage_done(run_dir, BASELINE, "evaluation"):
            missing.append("baseline/: evaluation not finished")
        elif name == LENGTH_CONTROL and not (column.directory / f"{LENGTH_CONTROL}.done.json").exists():
            missing.append(f"{LENGTH_CONTROL}/: not finished")
        if not column.outputs:
            missing.append(f"{name}/: no benchmark_outputs.jsonl")
    return missing


def engine_events(run_dir: str | Path) -> list[dict]:
    """engine_timings.jsonl's events, checked as EngineTiming; a torn or foreign line is skipped."""
    path = Path(run_dir) / "engine_timings.jsonl"
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() if path.exists() else [], 1):
        try:
            events.append(checked(EngineTiming, json.loads(line), f"{path}:{number}"))
        except (ValueError, RecordFileError):
            continue
    return events


def _words(path: Path, record_type) -> list[dict]:
    return read_records(path, record_type) if path.exists() else []


def benchmark_numbers(outputs: list[dict]) -> dict[str, Any]:
    """A column's benchmark numbers: finished lengths, length scores, stability, distinct-4 (per text on
    prefixes, and pooled)."""
    numbers: dict[str, Any] = {"lengths": finished_lengths(outputs)}
    if outputs:
        numbers["scores"] = summarize_scores(outputs)
        numbers["stability"] = length_stability(outputs)
    for language in LANGUAGES:
        texts = [r["output"] for r in outputs if r["language"] == language]
        numbers[f"prefix_distinct_{language}"] = prefix_distinct(texts, DISTINCT_N, language)
        numbers[f"pooled_distinct_{language}"] = round(distinct_n(texts, DISTINCT_N, language), 4) if texts else None
    return numbers


def loop_numbers(run_dir: Path, column: Column, filters: pd.DataFrame, runs: dict, events: list[dict]) -> dict[str, Any]:
    """An iteration's loop numbers: drafts' and extensions' words, extension ratio and acceptance, filter rates,
    training, seconds and tokens per stage."""
    k, directory = column.iteration, column.directory
    drafts = _words(directory / "drafts.jsonl", DraftRecord)
    extensions = _words(directory / "extensions.jsonl", ExtensionRecord)
    numbers: dict[str, Any] = {"drafts": [d["words"] for d in drafts], "extensions": [x["words"] for x in extensions],
                               "ratios": [x["words"] / x["draft_words"] for x in extensions if x["draft_words"]]}
    for language in LANGUAGES:
        numbers[f"drafts_{language}"] = [d["words"] for d in drafts if d["language"] == language]
        numbers[f"extensions_{language}"] = [x["words"] for x in extensions if x["language"] == language]
    extend = stage_summary(run_dir, k, "extensions")
    numbers["extend"] = extend
    numbers["filters"] = filters[filters["iteration"] == k].to_dict("records")
    numbers["drafts_summary"] = stage_summary(run_dir, k, "drafts")
    numbers["training"] = stage_summary(run_dir, k, "training")
    numbers["stages"] = {s: stage_numbers(runs.get((k, s)), events) for s in LOOP_STAGES}
    return numbers


TOKEN_EVENTS = ("closed", "served")  # engine_timings.jsonl events that carry a stage's generated tokens


def stage_numbers(run: dict | None, events: list[dict]) -> dict[str, Any]:
    """A stage's seconds (slkit.log's "done in") and the tokens its engines generated (engine_timings.jsonl's
    "closed" events of its in-process engines and "served" events of its engines on the run's server, from the
    stage's processes; None where there is none)."""
    if run is None:
        return {"seconds": None, "generated_tokens": None, "starts": 0}
    closed = [e for e in events if e["event"] in TOKEN_EVENTS and e["pid"] in run["pids"]
              and e.get("generated_tokens") is not None]
    return {"seconds": run["seconds"], "starts": run["starts"],
            "generated_tokens": sum(e["generated_tokens"] for e in closed) if closed else None}


@dataclass
class GrowthReport:
    run_dir: Path
    params: dict[str, Any]
    columns: list[Column]
    missing: list[str]
    unattributed_tokens: int | None

    # ------------------------------------------------------------------------------------------ the table
    def rows(self) -> list[tuple[str, dict[str, str]]]:
        """(row label, {column name: cell}) of the README's table, in order."""
        rows: list[tuple[str, dict[str, str]]] = []

        def row(label: str, value) -> None:
            cells = {c.name: value(c) for c in self.columns}
            cells = {name: "" if v is None else v for name, v in cells.items()}
            if any(cells.values()):
                rows.append((label, cells))

        bench = [c for c in self.columns if c.outputs]
        row("benchmark outputs", lambda c: _int(len(c.outputs)) if c.outputs else None)
        for language in LANGUAGES:
            row(f"finished median words, {language}", lambda c, lang=language: _num(_len(c, lang, "median")))
            row(f"finished mean words, {language}", lambda c, lang=language: _num(_len(c, lang, "mean")))
            row(f"finished answers, {language}", lambda c, lang=language: _of(_len(c, lang, "finished"),
                                                                            _len(c, lang, "outputs")))
        row("cut at the cap (share)", lambda c: _cut(c))
        for language in LANGUAGES:
            row(f"cut at the cap, {language}", lambda c, lang=language: _cut(c, lang))
        row("LonGen length score", lambda c: _num(c.numbers.get("scores", {}).get("overall"), 4))
        types = list(dict.fromkeys(t for c in bench for t in c.numbers["scores"]["per_type"]))
        for kind in types:
            row(f"length score, {kind}", lambda c, t=kind: _num(c.numbers.get("scores", {}).get("per_type", {}).get(t), 4))
        row("length stability (mean CV, lower is steadier)",
            lambda c: _num((c.numbers.get("stability") or {}).get("overall_cv"), 4))
        for language in LANGUAGES:
            units = PREFIX_UNITS[language]
            row(f"distinct-{DISTINCT_N} per text, first {units} {'words' if language == 'en' else 'characters'}, "
                f"{language} (texts measured)", lambda c, lang=language: _prefix(c, lang))
            row(f"distinct-{DISTINCT_N} pooled, whole answers, {language}",
                lambda c, lang=language: _num(c.numbers.get(f"pooled_distinct_{lang}"), 4) if c.outputs else None)
        row("judge mean (1-10)", lambda c: _num(c.numbers.get("judge"), 3))
        # the loop
        row("drafts: count", lambda c: _int(len(c.numbers["drafts"])) if c.is_loop else None)
        row("drafts: words mean / median", lambda c: _mean_median(c.numbers["drafts"]) if c.is_loop else None)
        for language in LANGUAGES:
            row(f"drafts: median words, {language}",
                lambda c, lang=language: _num(_median(c.numbers[f"drafts_{lang}"])) if c.is_loop else None)
        row("extensions: count", lambda c: _int(len(c.numbers["extensions"])) if c.is_loop else None)
        row("extensions: words mean / median", lambda c: _mean_median(c.numbers["extensions"]) if c.is_loop else None)
        for language in LANGUAGES:
            row(f"extensions: median words, {language}",
                lambda c, lang=language: _num(_median(c.numbers[f"extensions_{lang}"])) if c.is_loop else None)
        row("extension ratio (extension / its draft, median)",
            lambda c: _num(_median(c.numbers["ratios"]), 2, "x") if c.is_loop else None)
        row("extension acceptance (accepted / jobs)", lambda c: _of(c.numbers["extend"].get("extensions"),
                                                                   c.numbers["extend"].get("jobs"), rate=True)
            if c.is_loop and c.numbers["extend"] else None)
        for label in self._filter_labels():
            row(f"filter: {label}", lambda c, lab=label: self._filter_cell(c, lab))
        for label, key in (("extension retries (failed tries tried again) per job", "retried"),
                           ("extension jobs given up", "gave_up"),
                           ("extension jobs dropped (finish_share)", "dropped")):
            row(label, lambda c, key=key: _of(c.numbers["extend"]["counts"].get(key), c.numbers["extend"]["jobs"],
                                              rate=True) if c.is_loop and c.numbers["extend"]
                and key in c.numbers["extend"]["counts"] else None)
        row("draft slots given up (out of tries)", lambda c: _int(c.numbers["drafts_summary"].get("rejected", {})
                                                                  .get("gave_up")) if c.is_loop else None)
        for role in ("generator", "extender"):
            row(f"training {role}: samples", lambda c, r=role: _int(_adapter(c, r).get("samples")))
            row(f"training {role}: loss first -> final", lambda c, r=role: _losses(_adapter(c, r)))
            row(f"training {role}: steps, seconds", lambda c, r=role: _steps(_adapter(c, r)))
            row(f"training {role}: tokens trained on", lambda c, r=role: _int(_adapter(c, r).get("tokens")))
        for stage in LOOP_STAGES + (LENGTH_CONTROL,):
            row(f"seconds: {stage}", lambda c, s=stage: _num(_stage(c, s).get("seconds"), 1))
        for stage in LOOP_STAGES + (LENGTH_CONTROL,):
            row(f"generated tokens: {stage}", lambda c, s=stage: _int(_stage(c, s).get("generated_tokens")))
        # the targets, each column against the baseline
        base = self.baseline()
        if base is not None and base.outputs:
            for language in LANGUAGES:
                row(f"finished median words vs baseline, {language} (goal {WORDS_TARGET:g}x, least {WORDS_LEAST:g}x)",
                    lambda c, lang=language: _num(_ratio(_len(c, lang, "median"), _len(base, lang, "median")), 2, "x")
                    if c is not base else None)
            row(f"length score vs baseline (goal {SCORE_TARGET:g}x)",
                lambda c: _num(_ratio(c.numbers.get("scores", {}).get("overall"),
                                      base.numbers["scores"]["overall"]), 2, "x") if c is not base else None)
            for language in LANGUAGES:
                row(f"distinct-{DISTINCT_N} per text vs baseline, {language} (goal {DISTINCT_TARGET:g}x)",
                    lambda c, lang=language: _num(_ratio(_prefix_mean(c, lang), _prefix_mean(base, lang)), 3, "x")
                    if c is not base else None)
        return rows

    def _filter_labels(self) -> list[str]:
        labels: list[str] = []
        for c in self.columns:
            if c.is_loop:
                labels += [f"{f['stage']} {f['check']}" for f in c.numbers["filters"]]
        return list(dict.fromkeys(labels))

    def _filter_cell(self, column: Column, label: str) -> str | None:
        if not column.is_loop:
            return None
        hits = [f for f in column.numbers["filters"] if f"{f['stage']} {f['check']}" == label]
        return _of(hits[0]["count"], hits[0]["out_of"], rate=True) if hits else None

    def baseline(self) -> Column | None:
        return next((c for c in self.columns if c.name == "baseline"), None)

    def last_iteration(self) -> Column | None:
        """The last macro-iteration with benchmark outputs: the one the targets are judged on."""
        return next((c for c in reversed(self.columns) if c.is_loop and c.outputs), None)

    # ------------------------------------------------------------------------------------------ the targets
    def targets(self) -> list[dict[str, Any]]:
        """Issue 25's targets: the last macro-iteration against the baseline. Each: target, baseline, value,
        ratio, goal and verdict (met / met the least / not met / not measured)."""
        base, last = self.baseline(), self.last_iteration()
        if base is None or last is None or not base.outputs:
            return []
        out = []
        for language in LANGUAGES:
            b, v = _len(base, language, "median"), _len(last, language, "median")
            r = _ratio(v, b)
            verdict = None if r is None else "met" if r >= WORDS_TARGET else \
                f"met the least ({WORDS_LEAST:g}x)" if r >= WORDS_LEAST else "not met"
            out.append({"target": f"finished median words, {language}", "baseline": _num(b), "value": _num(v),
                        "ratio": _num(r, 2, "x"), "goal": f">= {WORDS_TARGET:g}x ({WORDS_LEAST:g}x at the least)",
                        "verdict": verdict})
        b, v = base.numbers["scores"]["overall"], last.numbers["scores"]["overall"]
        r = _ratio(v, b)
        out.append({"target": "LonGen length score", "baseline": _num(b, 4), "value": _num(v, 4),
                    "ratio": _num(r, 2, "x"), "goal": f">= {SCORE_TARGET:g}x",
                    "verdict": None if r is None else "met" if r >= SCORE_TARGET else "not met"})
        b, v = base.numbers["lengths"]["all"]["cut_share"], last.numbers["lengths"]["all"]["cut_share"]
        out.append({"target": "share cut at the cap", "baseline": _pct(b), "value": _pct(v), "ratio": "",
                    "goal": "<= the baseline's",
                    "verdict": None if b is None or v is None else "met" if v <= b else "not met"})
        for language in LANGUAGES:
            b, v = _prefix_mean(base, language), _prefix_mean(last, language)
            r = _ratio(v, b)
            out.append({"target": f"distinct-{DISTINCT_N} per text (first {PREFIX_UNITS[language]} units), {language}",
                        "baseline": _num(b, 4), "value": _num(v, 4), "ratio": _num(r, 3, "x"),
                        "goal": f">= {DISTINCT_TARGET:g}x",
                        "verdict": None if r is None else "met" if r >= DISTINCT_TARGET else "not met"})
        for t in out:  # a ratio needs both numbers: say whose is missing
            if t["verdict"] is None:
                lacking = [name for name, key in (("baseline", "baseline"), (last.name, "value")) if t[key] is None]
                t["verdict"] = (f"not measured (none at {' and '.join(lacking)})" if lacking
                                else "not measured (the baseline's is 0)")
        return out

    # ------------------------------------------------------------------------------------------ the figure's data
    def growth_table(self) -> pd.DataFrame:
        """Rows of growth.png: column, position, series (finished answers, drafts, extensions), language, median."""
        rows = []
        for position, c in enumerate(self.columns):
            for language in LANGUAGES:
                if c.outputs and _len(c, language, "median") is not None:
                    rows.append({"column": c.name, "position": position, "series": "benchmark answers (finished)",
                                 "language": language, "median": _len(c, language, "median")})
                if c.is_loop:
                    for series in ("drafts", "extensions"):
                        words = c.numbers[f"{series}_{language}"]
                        if words:
                            rows.append({"column": c.name, "position": position, "series": series,
                                         "language": language, "median": median(words)})
        return pd.DataFrame(rows, columns=["column", "position", "series", "language", "median"])

    # ------------------------------------------------------------------------------------------ markdown
    def table_markdown(self) -> str:
        names = [c.name for c in self.columns]
        lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {label} | " + " | ".join(cells[n] for n in names) + " |" for label, cells in self.rows()]
        return "\n".join(lines) + "\n"

    def targets_markdown(self) -> str:
        targets = self.targets()
        last = self.last_iteration()
        if not targets:
            return "No targets: the run has no baseline benchmark outputs or no iteration evaluated yet.\n"
        head = (f"{last.name} against the baseline" + ("" if last.name == f"iter_{self.expected_iterations()}"
                                                       else f" (the run asks for {self.expected_iterations()} "
                                                            "iterations: this is not the final verdict)"))
        lines = [head, "", "| target | baseline | " + last.name + " | ratio | goal | verdict |",
                 "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(t[key] or "-" for key in ("target", "baseline", "value", "ratio", "goal", "verdict"))
                  + " |" for t in targets]
        return "\n".join(lines) + "\n"

    def expected_iterations(self) -> int:
        return int(self.params.get("macro_iterations", 3))


def growth_report(run_dir: str | Path) -> GrowthReport:
    """Every number of a run's growth report, read from its files (see the module's docstring)."""
    run_dir = Path(run_dir)
    params = run_params(run_dir)
    columns = found_columns(run_dir)
    runs = stage_runs(run_dir)
    events = engine_events(run_dir)
    filters = filter_table(run_dir)
    for c in columns:
        c.numbers = benchmark_numbers(c.outputs)
        metrics_path = c.directory / c.metrics_file
        if c.name == LENGTH_CONTROL:
            summary = read_document(metrics_path, LengthControlSummary) if metrics_path.exists() else {}
            c.numbers["training"] = {"generator": summary["training"]} if summary else {}
            c.numbers["stages"] = {LENGTH_CONTROL: stage_numbers(runs.get((c.iteration, LENGTH_CONTROL)), events)}
            continue
        if metrics_path.exists():
            c.numbers["judge"] = (read_document(metrics_path, EvaluationSummary)["judge"] or {}).get("overall")
        if c.is_loop:
            c.numbers.update(loop_numbers(run_dir, c, filters, runs, events))
        else:
            c.numbers["stages"] = {"evaluation": stage_numbers(runs.get((BASELINE, "evaluation")), events)}
    pids = {pid for run in runs.values() for pid in run["pids"]}
    stray = [e["generated_tokens"] for e in events if e["event"] in TOKEN_EVENTS and e["pid"] not in pids
             and e.get("generated_tokens")]
    return GrowthReport(run_dir, params, columns, missing_parts(run_dir, params, columns), sum(stray) if stray else None)


# ---------------------------------------------------------------------------------------------- cells

def _len(column: Column, language: str, key: str):
    return (column.numbers.get("lengths", {}).get(language) or {}).get(key) if column.outputs else None


def _prefix_mean(column: Column, language: str) -> float | None:
    return (column.numbers.get(f"prefix_distinct_{language}") or {}).get("mean") if column.outputs else None


def _prefix(column: Column, language: str) -> str | None:
    if not column.outputs:
        return None
    d = column.numbers[f"prefix_distinct_{language}"]
    return f"{_num(d['mean'], 4) or '-'} ({d['texts']} of {d['of']})"


def _cut(column: Column, language: str = "all") -> str | None:
    if not column.outputs:
        return None
    cut, recorded = _len(column, language, "cut"), _len(column, language, "cut_recorded")
    return "not recorded" if cut is None else _of(cut, recorded, rate=True)


def _adapter(column: Column, role: str) -> dict:
    return (column.numbers.get("training") or {}).get(role) or {}


def _stage(column: Column, stage: str) -> dict:
    return (column.numbers.get("stages") or {}).get(stage) or {}


def _losses(adapter: dict) -> str | None:
    if not adapter:
        return None
    if not adapter.get("trained"):
        return f"not trained ({adapter.get('reason') or 'no reason recorded'})"
    return f"{_num(adapter.get('first_loss'), 3)} -> {_num(adapter.get('final_loss'), 3)}"


def _steps(adapter: dict) -> str | None:
    if not adapter or not adapter.get("trained"):
        return None
    return f"{_int(adapter.get('steps'))}, {_num(adapter.get('seconds'), 1)} s"


def _median(values: list) -> float | None:
    return median(values) if values else None


def _mean_median(values: list) -> str | None:
    return f"{_num(mean(values))} / {_num(median(values))}" if values else None


def _ratio(value, base) -> float | None:
    return value / base if value is not None and base else None


def _int(value) -> str | None:
    return None if value is None else f"{int(value):,}"


def _num(value, digits: int = 0, suffix: str = "") -> str | None:
    if value is None or math.isnan(value):
        return None
    return (f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}") + suffix


def _pct(value) -> str | None:
    return None if value is None else f"{value:.1%}"


def _of(count, out_of, rate: bool = False) -> str | None:
    if count is None or out_of is None:
        return None
    if rate and out_of:
        return f"{count / out_of:.1%} ({count:,}/{out_of:,})"
    return f"{count:,} of {out_of:,}"


# ---------------------------------------------------------------------------------------------- excerpts

EXCERPT_WORDS, EXCERPT_CHARS = 120, 240  # the first 120 English words, or 240 characters of Chinese


def excerpt(text: str, language: str) -> str:
    """The start of an answer: its first EXCERPT_WORDS words (en) or EXCERPT_CHARS characters (zh), "..." when cut."""
    if language == "zh":
        return text[:EXCERPT_CHARS] + (" ..." if len(text) > EXCERPT_CHARS else "")
    words = text.split()
    return " ".join(words[:EXCERPT_WORDS]) + (" ..." if len(words) > EXCERPT_WORDS else "")


def excerpt_items(columns: list[Column]) -> list[int]:
    """The benchmark items the excerpts follow: per language (en, zh), the first index whose sample 0 every column
    with outputs answered, so one query is read across the iterations."""
    with_outputs = [c for c in columns if c.outputs]
    if not with_outputs:
        return []
    common = set.intersection(*({r["index"] for r in c.outputs if r["sample"] == 0} for c in with_outputs))
    first = with_outputs[0]
    chosen = []
    for language in LANGUAGES:
        indices = sorted(i for i in common if any(r["index"] == i and r["language"] == language for r in first.outputs))
        if indices:
            chosen.append(indices[0])
    return chosen


def excerpts_markdown(report: GrowthReport) -> str:
    """excerpts.md: for one English and one Chinese benchmark query, the start of each column's answer (sample 0)."""
    lines = [f"# Excerpts: {report.run_dir.name}", "",
             f"The same benchmark queries across the run (sample 0 of each): the query, then each stage's answer: its "
             f"words, whether the cap cut it, its length score, and its first {EXCERPT_WORDS} words (English) or "
             f"{EXCERPT_CHARS} characters (Chinese).", ""]
    items = excerpt_items(report.columns)
    if not items:
        return "\n".join(lines + ["No benchmark outputs in the run yet.", ""])
    for index in items:
        first = next(r for c in report.columns for r in c.outputs if r["index"] == index and r["sample"] == 0)
        interval = f", accepted {first['interval'][0]:,.0f}-{first['interval'][1]:,.0f} words" if first["interval"] else ""
        lines += [f"## Query {index} ({first['language']}, {first['type']}{interval})", "", _quote(first["query"]), ""]
        for c in report.columns:
            answer = next((r for r in c.outputs if r["index"] == index and r["sample"] == 0), None)
            if answer is None:
                continue
            cut = {True: "cut at the cap", False: "finished", None: "cut not recorded"}[answer["cut"]]
            lines += [f"### {c.name}: {answer['words']:,} words, {cut}, score {answer['score']:.3f}", "",
                      _quote(excerpt(answer["output"], answer["language"])), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return "\n".join("> " + line if line.strip() else ">" for line in text.strip().splitlines()) or ">"


# ---------------------------------------------------------------------------------------------- the README

def readme_markdown(report: GrowthReport, published: dict[str, list[str]], top: list[str]) -> str:
    """The published folder's README.md: status (what is missing), the growth figure, the table, the targets and
    links to the files; `published` maps each column to the files copied into its folder, `top` the run's files
    copied beside the README."""
    p = report.params
    model = (p.get("model") or {}).get("path", "?")
    engine = (p.get("engine") or {}).get("backend", "?")
    lines = [f"# Growth run `{p.get('run_name', report.run_dir.name)}`: {model}", ""]
    if report.missing:
        lines += ["**Status: partial.** Missing from the run directory this was published from:", ""]
        lines += [f"- {m}" for m in report.missing] + [""]
    else:
        lines += [f"**Status: complete**: the baseline, {report.expected_iterations()} macro-iteration(s)"
                  + (" and the length-control stage" if LENGTH_CONTROL in expected_columns(p) else "") + ".", ""]
    lines += [f"- Recipe: the run's own [`params.yaml`](params.yaml) ({report.expected_iterations()} macro-iterations, "
              f"engine {engine}); what it did: [`slkit.log`](slkit.log)"
              + (", [`engine_timings.jsonl`](engine_timings.jsonl)" if "engine_timings.jsonl" in top else
                 " (no `engine_timings.jsonl` in the run)") + ".",
              "- Generated by `python tools/growth_report.py RUN_DIR OUT_DIR` (slkit.evaluation.growth): every number "
              "below is read from the run's files.",
              "- Answers of the model at each stage: [`excerpts.md`](excerpts.md).", ""]
    if "growth.png" in top:
        lines += ["![median words per iteration](growth.png)", ""]
    lines += ["## Per iteration", "", report.table_markdown(),
              "How to read it:", "",
              "- *finished*: benchmark answers the model ended itself; an answer whose `cut` is true "
              "(benchmark_outputs.jsonl) was stopped by max_new_tokens, its length the cap's. Words by the "
              "benchmark's counter (LonGen: slkit's, a Chinese character is a word). *cut at the cap*: the share "
              "of answers that record `cut`.",
              "- Length score and stability: slkit.evaluation.benchmarks (summarize_scores, length_stability) over "
              "every answer (LonGen: 0-1 per answer; stability: mean coefficient of variation of a query's samples).",
              f"- distinct-{DISTINCT_N} per text: each answer's first {PREFIX_UNITS['en']} English words or "
              f"{PREFIX_UNITS['zh']} Chinese characters alone, mean over the answers long enough (how many, of how "
              f"many: in brackets). Pooled: all answers of a language at once; it falls with length by itself.",
              "- Drafts, extensions: drafts.jsonl and extensions.jsonl of the iteration (before resampling); the "
              "ratio is an extension's words over its draft's. Filters: reports.filter_table over the stages' "
              "done-markers (rate = count / candidates the check saw). Training: training.done.json "
              "(length_control: length_control.json, the final Generator).",
              "- Seconds: slkit.log's \"done in\" of each stage (the last start of a resumed one). Generated "
              "tokens: engine_timings.jsonl's `closed` (in-process engine) and `served` (the run's server, its "
              "counters while the stage's engine was open) events of the stage's processes; blank where none."
              + (f" Tokens of engines outside the stages' processes: {report.unattributed_tokens:,}."
                 if report.unattributed_tokens else ""), "",
              "## Targets (issue 25)", "", report.targets_markdown(), "## Files", ""]
    for c in report.columns:
        files = published.get(c.name, [])
        links = ", ".join(f"[`{name}`]({c.name}/{name})" for name in files) or "none"
        lines.append(f"- `{c.name}/`: {links}")
    lines += [f"- [`{name}`]({name})" for name in top if name != "README.md"]
    lines += ["", "Not published: adapters, checkpoints and the training sets (`*_sft.jsonl`).", ""]
    return "\n".join(lines)
