"""tools/growth_report.py and slkit.evaluation.growth: a run directory (whole or partial) becomes the published
folder of docs/results, with numbers computed from the run's files (issue 25)."""
import gzip
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from slkit.core.records import mark_done, write_json_atomic, write_jsonl_atomic
from slkit.core.schema import (
    BenchmarkOutput,
    DraftRecord,
    DraftsSummary,
    EngineTiming,
    EvaluationSummary,
    ExtensionRecord,
    ExtensionsSummary,
    LengthControlSummary,
    QueriesSummary,
    TrainingSummary,
)
from slkit.evaluation.benchmarks import summarize_scores
from slkit.evaluation.growth import growth_report
from slkit.evaluation.reports import finished_lengths, prefix_distinct, text_prefix
from slkit.method.textstats import count_words

sys.path.insert(0, str(REPO / "tools"))
import growth_report as tool


def en_text(n, repeat=None):
    """n English words, all distinct, or `repeat` words over and over."""
    return " ".join(f"w{i % repeat if repeat else i}" for i in range(n))


def zh_text(n):
    return "".join(chr(0x4E00 + i) for i in range(n))


# ---------------------------------------------------------------------------------------------- the metrics

def test_text_prefix_matches_units():
    assert text_prefix(en_text(10), "en", 3) == "w0 w1 w2"
    assert text_prefix(en_text(2), "en", 3) is None
    assert text_prefix("一二abc 三", "zh", 3) == "一二abc "  # an ASCII run is one unit
    assert text_prefix(zh_text(5), "zh", 6) is None


def test_prefix_distinct_leaves_short_texts_out():
    texts = [en_text(300), en_text(300, repeat=4), en_text(299)]
    d = prefix_distinct(texts, 4, "en")
    assert (d["texts"], d["of"], d["units"]) == (2, 3, 300)
    # 297 4-grams each: all distinct in the first; 4 distinct in the repeating one
    assert d["mean"] == pytest.approx(round((1 + 4 / 297) / 2, 4))
    assert prefix_distinct([zh_text(100)], 4, "zh")["mean"] is None


def test_finished_lengths_by_language():
    outputs = [{"language": "en", "words": w, "cut": c} for w, c in ((100, False), (200, False), (900, True))]
    outputs += [{"language": "zh", "words": 50, "cut": None}]
    table = finished_lengths(outputs)
    assert table["en"] == {"outputs": 3, "cut_recorded": 3, "cut": 1, "cut_share": 0.3333, "finished": 2,
                           "median": 150, "mean": 150.0}
    assert table["zh"]["cut"] is None and table["zh"]["finished"] == 1  # not recorded: counted as finished
    assert table["all"]["cut_share"] == 0.3333 and table["all"]["cut_recorded"] == 3


# ---------------------------------------------------------------------------------------------- a synthetic run

# (language, words, cut, score) of each benchmark answer, per column; index i answers item i, sample 0
ANSWERS = {
    "baseline": [("en", 100, False, 0.1), ("en", 200, False, 0.1), ("en", 300, True, 0.1),
                 ("zh", 400, False, 0.1), ("zh", 600, True, 0.1)],
    "iter_1": [("en", 200, False, 0.3), ("en", 300, False, 0.3), ("en", 400, False, 0.3),
               ("zh", 500, False, 0.3), ("zh", 700, True, 0.3)],
    "iter_2": [("en", 300, False, 0.6), ("en", 500, False, 0.6), ("en", 700, False, 0.6),
               ("zh", 800, False, 0.6), ("zh", 900, False, 0.6)],
    "length_control": [("en", 250, False, 0.8), ("en", 260, False, 0.8), ("en", 270, False, 0.8),
                       ("zh", 700, False, 0.8), ("zh", 710, False, 0.8)],
}


def outputs(column):
    records = []
    for i, (language, words, cut, score) in enumerate(ANSWERS[column]):
        # the last iteration's English answers loop (4 words over and over): per-text distinct-4 falls
        text = (en_text(words, repeat=4 if column == "iter_2" else None) if language == "en" else zh_text(words))
        assert count_words(text) == words
        records.append(BenchmarkOutput(index=i, sample=0, query=f"query {i} ({language})", language=language,
                                       type="about" if i % 2 else "range", bin="2k-4k", required=500.0,
                                       interval=[400.0, 600.0], words=words, counter="slkit", words_slkit=words,
                                       words_longwriter=words, score=score, cut=cut, output=text))
    return records


def evaluation(k, run_name, records):
    scores = summarize_scores([r.model_dump() for r in records])
    lf = {"benchmark": "LonGen.jsonl", "format": "longen", "max_score": 1.0, **scores, "stability": None,
          "capped": None}
    return EvaluationSummary(iteration=k, run=run_name, length_following=lf, judge=None, words={}, counts={},
                             figures=["lengths.png"])


def make_run(root, iterations=2, expected=2, length_control=True):
    """A run directory as slkit writes it, with `iterations` of `expected` macro-iterations done."""
    run = root / "run"
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump({
        "run_name": "synthetic", "macro_iterations": expected, "model": {"path": "builtin:tiny"},
        "engine": {"backend": "vllm"}, "evaluation": {"baseline": True}, "length_control": {"enabled": True}}))
    log = ["2026-12-03 12:00:00,000 INFO [pid 1] slkit run p.yaml: 2 macro-iterations, model x, engine vllm",
           "2026-12-03 12:00:10,000 INFO [pid 10] baseline evaluation: start",
           "2026-12-03 12:01:10,000 INFO [pid 10] baseline evaluation: done in 60.0 s: iteration=0"]
    events = []
    for column in ["baseline"] + [f"iter_{k}" for k in range(1, iterations + 1)]:
        k = 0 if column == "baseline" else int(column.split("_")[1])
        d = run / column
        d.mkdir()
        records = outputs(column)
        write_jsonl_atomic(d / "benchmark_outputs.jsonl", records)
        (d / "lengths.png").write_bytes(b"\x89PNG fake")
        (d / "04_evaluation.ipynb").write_text("{}")
        if k:
            drafts = [DraftRecord(id=f"it{k}-q{i}-d0", query_id=f"it{k}-q{i}", query="q", language=lang, sample=0,
                                  draft=en_text(w), words=w, tries=1)
                      for i, (lang, w) in enumerate((("en", 100 * k), ("en", 300 * k), ("zh", 200 * k)))]
            write_jsonl_atomic(d / "drafts.jsonl", drafts)
            extensions = [ExtensionRecord(id=f"{x.id}-x0", draft_id=x.id, sample=0, query_id=x.query_id, query="q",
                                          language=x.language, draft=x.draft, draft_words=x.words,
                                          extended=en_text(2 * x.words), words=2 * x.words, ratio=2.0, tries=1,
                                          micro_iterations_accepted=1) for x in drafts[:2]]
            write_jsonl_atomic(d / "extensions.jsonl", extensions)
            for name in ("generator_sft.jsonl", "extender_sft.jsonl"):
                (d / name).write_text('{"id": "x", "prompt": "p", "completion": "c"}\n')
            for role in ("generator", "extender"):
                (d / "adapters" / role).mkdir(parents=True)
                (d / "adapters" / role / "adapter_model.safetensors").write_bytes(b"weights")
            mark_done(d, "queries", QueriesSummary(queries=10, rejected={"judge_no": 2}, pool_size=66))
            mark_done(d, "drafts", DraftsSummary(drafts=3, rejected={"repetition": 6, "too_short": 1, "gave_up": 1}))
            mark_done(d, "extensions", ExtensionsSummary(
                extensions=2, drafts=3, resampled_drafts=2, jobs=4,
                counts={"micro_iteration_accepted": 2, "micro_iteration_rejected_not_longer": 6, "accepted": 2,
                        "gave_up": 2}))
            adapter = {"samples": 2, "trained": True, "steps": 1, "seconds": 5.0, "tokens": 900,
                       "first_loss": 2.0, "final_loss": 1.25}
            mark_done(d, "training", TrainingSummary(extensions=2, resampled_extensions=2, generator=adapter,
                                                     extender=adapter))
            pid = 100 * k
            log += [f"2026-12-03 12:0{k}:00,000 INFO [pid {pid}] iteration {k} drafts: start",
                    f"2026-12-03 12:0{k}:30,000 INFO [pid {pid}] iteration {k} drafts: done in 30.5 s: drafts=3"]
            # iteration 1 as an in-process engine reports its tokens, iteration 2 as an engine on the run's server
            events.append(EngineTiming(event="closed" if k == 1 else "served", at=1.0, pid=pid, generate_s=20.0,
                                       requests=9 if k == 1 else None, generated_tokens=5000 * k))
        metrics = evaluation(k, "synthetic", records)
        write_json_atomic(d / "evaluation.json", metrics)
        mark_done(d, "evaluation", metrics)
    if length_control:
        d = run / "length_control"
        d.mkdir()
        records = outputs("length_control")
        write_jsonl_atomic(d / "benchmark_outputs.jsonl", records)
        (d / "generator_sft.jsonl").write_text("{}\n")
        (d / "adapters" / "generator").mkdir(parents=True)
        (d / "adapters" / "generator" / "adapter_model.safetensors").write_bytes(b"weights")
        summary = LengthControlSummary(
            pairs=4, sources={}, skipped={}, collection=None, kinds={}, fallbacks={}, rewrites={},
            model_rewrites_refused={}, training={"samples": 4, "trained": True, "steps": 2, "first_loss": 1.5,
                                                 "final_loss": 0.75},
            length_before=None, length_after=evaluation(iterations, "synthetic", records).length_following)
        write_json_atomic(d / "length_control.json", summary)
        mark_done(d, "length_control", summary, iteration=iterations)
    (run / "slkit.log").write_text("\n".join(log) + "\n")
    write_jsonl_atomic(run / "engine_timings.jsonl", events)
    return run


def table(readme):
    """The README's per-iteration table: {row label: [cells]}."""
    rows = {}
    for line in readme.split("## Per iteration")[1].split("How to read it")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 1 and cells[0] and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_publishes_a_whole_run(tmp_path):
    run = make_run(tmp_path)
    out = tmp_path / "docs" / "growth"
    report = tool.publish(run, out)
    assert [c.name for c in report.columns] == ["baseline", "iter_1", "iter_2", "length_control"]
    assert report.missing == []
    for column in ("baseline", "iter_1", "iter_2"):
        assert {p.name for p in (out / column).iterdir()} >= {"evaluation.json", "benchmark_outputs.jsonl.gz",
                                                              "lengths.png", "evaluation.done.json"}
    assert {p.name for p in (out / "length_control").iterdir()} >= {"length_control.json",
                                                                    "benchmark_outputs.jsonl.gz"}
    for name in ("README.md", "excerpts.md", "growth.png", "params.yaml", "slkit.log", "engine_timings.jsonl"):
        assert (out / name).is_file(), name
    # the benchmark answers, whole
    with gzip.open(out / "iter_2" / "benchmark_outputs.jsonl.gz", "rt", encoding="utf-8") as f:
        assert f.read() == (run / "iter_2" / "benchmark_outputs.jsonl").read_text(encoding="utf-8")
    # nothing of the adapters, training sets or notebooks
    published = [p.name for p in out.rglob("*")]
    assert not [n for n in published if n.endswith(("_sft.jsonl", ".safetensors", ".ipynb")) or n == "adapters"]

    readme = (out / "README.md").read_text(encoding="utf-8")
    rows = table(readme)
    assert "Status: complete" in readme
    # finished median words: en 150 (100, 200; the 300 was cut) -> 500 after iteration 2; zh 400 -> 850
    assert rows["finished median words, en"] == ["150", "300", "500", "260"]
    assert rows["finished median words, zh"] == ["400", "500", "850", "705"]
    assert rows["cut at the cap (share)"][0] == "40.0% (2/5)"
    assert rows["cut at the cap (share)"][2] == "0.0% (0/5)"
    assert rows["LonGen length score"] == ["0.1000", "0.3000", "0.6000", "0.8000"]
    # per-text distinct-4 on the first 300 words: only the baseline's 300-word answer is long enough
    assert rows["distinct-4 per text, first 300 words, en (texts measured)"][0] == "1.0000 (1 of 3)"
    assert rows["distinct-4 per text, first 300 words, en (texts measured)"][2] == "0.0135 (3 of 3)"
    assert rows["drafts: words mean / median"][1:3] == ["200 / 200", "400 / 400"]  # 100, 300, 200 words x k
    assert rows["extension ratio (extension / its draft, median)"][1] == "2.00x"
    assert rows["extension acceptance (accepted / jobs)"][1] == "50.0% (2/4)"
    assert rows["filter: drafts rejected: repetition"][1] == "60.0% (6/10)"
    assert rows["filter: extension micro-iteration rejected not_longer"][1] == "75.0% (6/8)"
    assert rows["training generator: loss first -> final"] == ["", "2.000 -> 1.250", "2.000 -> 1.250",
                                                               "1.500 -> 0.750"]
    assert rows["seconds: drafts"][1:3] == ["30.5", "30.5"]
    assert rows["seconds: evaluation"][0] == "60.0"
    assert rows["generated tokens: drafts"][1:3] == ["5,000", "10,000"]
    # the targets, iter_2 against the baseline
    verdicts = {t["target"]: t["verdict"] for t in report.targets()}
    assert verdicts["finished median words, en"] == "met"  # 500 / 150 = 3.3x
    assert verdicts["finished median words, zh"] == "met the least (2x)"  # 850 / 400 = 2.1x
    assert verdicts["LonGen length score"] == "met"  # 6x
    assert verdicts["share cut at the cap"] == "met"
    assert verdicts["distinct-4 per text (first 300 units), en"] == "not met"
    assert verdicts["distinct-4 per text (first 600 units), zh"] == "met"
    assert "| finished median words, en | 150 | 500 | 3.33x |" in readme
    # excerpts: one English and one Chinese query, read across every column
    excerpts = (out / "excerpts.md").read_text(encoding="utf-8")
    assert excerpts.count("## Query") == 2 and "(en," in excerpts and "(zh," in excerpts
    assert excerpts.count("### iter_2") == 2


def test_publishes_a_partial_run_saying_what_is_missing(tmp_path):
    run = make_run(tmp_path, iterations=2, expected=3, length_control=False)
    os.remove(run / "iter_2" / "training.done.json")
    out = tmp_path / "out"
    report = tool.publish(run, out)
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "Status: partial" in readme
    assert "- iter_2/: stage(s) not finished: training" in readme
    assert "- iter_3/: not in the run directory" in readme
    assert "- length_control/: not in the run directory" in readme
    assert "(the run asks for 3 iterations: this is not the final verdict)" in readme
    assert [c.name for c in report.columns] == ["baseline", "iter_1", "iter_2"]
    assert (out / "iter_2" / "benchmark_outputs.jsonl.gz").is_file() and not (out / "length_control").exists()


def test_refuses_to_overwrite_without_replace(tmp_path):
    run = make_run(tmp_path, iterations=1, expected=1, length_control=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.md").write_text("the partial one")
    cmd = [sys.executable, str(REPO / "tools" / "growth_report.py"), str(run), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert refused.returncode != 0 and "--replace" in refused.stderr
    done = subprocess.run(cmd + ["--replace"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert not (out / "old.md").exists() and (out / "README.md").exists()
    assert "| finished median words, en |" in done.stdout


def test_report_reads_the_run_not_the_published_folder(tmp_path):
    run = make_run(tmp_path, iterations=1, expected=1)
    report = growth_report(run)
    assert json.loads((run / "iter_1" / "evaluation.json").read_text())["length_following"]["overall"] == \
        report.columns[1].numbers["scores"]["overall"]
