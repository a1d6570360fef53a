"""End to end: `slkit run` executes the five notebooks with papermill for 2 macro-iterations on the
smoke recipe (tiny random model), then a rerun skips every finished stage."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from slkit.core.params import ParamsError
from slkit.core.registry import ITERATION_STAGES
from slkit.running.loop import run_loop
from slkit.running.pipeline import prepare_run
from test_lessons import without_math

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_model_path):
    out = tmp_path_factory.mktemp("runs")
    run_dir = run_loop(REPO / "params" / "smoke.yaml", {"output_dir": str(out)}, show_progress=False)
    return run_dir


def test_run_writes_every_file_of_both_iterations(smoke_run):
    from datasets import load_dataset

    assert (smoke_run / "params.yaml").exists()
    for k in (1, 2):
        d = smoke_run / f"iter_{k}"
        for name in ("00_queries", "01_drafts", "02_extensions", "03_training", "04_evaluation"):
            nb = json.loads((d / f"{name}.ipynb").read_text())
            assert nb["metadata"]["papermill"]["parameters"] == {"run_dir": str(smoke_run), "iteration": k}
        for stage in ITERATION_STAGES:
            assert (d / f"{stage}.done.json").exists()
        for name in ("queries", "drafts", "extensions", "resampled_extensions", "generator_sft", "extender_sft", "benchmark_outputs",
                     "judgements"):
            rows = load_dataset("json", data_files=str(d / f"{name}.jsonl"), split="train")
            assert len(rows) > 0, name
        for role in ("generator", "extender"):
            assert (d / "adapters" / role / "adapter_model.safetensors").exists()
        for figure in ("lengths", "required_vs_produced", "length_scores", "length_stability", "filter_rates",
                       "distinct_n"):
            assert (d / f"{figure}.png").stat().st_size > 5000, figure
        assert not list(d.glob("*.partial"))


def test_metrics_and_iteration_chaining(smoke_run):
    m1 = json.loads((smoke_run / "iter_1" / "evaluation.json").read_text())
    m2 = json.loads((smoke_run / "iter_2" / "evaluation.json").read_text())
    for m in (m1, m2):
        lf = m["length_following"]
        assert lf["format"] == "longen" and lf["n"] == 16  # 8 queries x 2 samples
        assert set(lf["per_type"]) == {"about", "range", "above", "below"} and 0 <= lf["overall"] <= 1
        assert set(lf["per_length_bin"]) <= {"2-4k", "4-6k", "6-8k"} and set(lf["per_language"]) == {"en", "zh"}
        assert lf["stability"]["queries"] <= 8 and lf["stability"]["samples_per_query"] == 2
        assert lf["stability"]["overall_cv"] >= 0
        # the random model never writes the judge's JSON: every response is counted as failed, none dropped
        assert m["judge"]["judged"] + m["judge"]["failed"] == 8 and m["judge"]["failure_rate"] == 1.0
        assert m["counts"]["queries"] == 4 and m["counts"]["drafts"] == 8
        assert m["words"]["extensions"] > m["words"]["drafts"]
    train2 = json.loads((smoke_run / "iter_2" / "training.done.json").read_text())["summary"]
    assert train2["generator"]["init_adapter"] == str(smoke_run / "iter_1" / "adapters" / "generator")
    # iteration 2's queries are new: none repeats iteration 1's
    q1 = {json.loads(line)["query"] for line in (smoke_run / "iter_1" / "queries.jsonl").open()}
    q2 = {json.loads(line)["query"] for line in (smoke_run / "iter_2" / "queries.jsonl").open()}
    assert not q1 & q2


def test_the_base_model_is_evaluated_first_with_the_same_subset_and_seeds(smoke_run):
    """runs/<run>/baseline/: the untrained model on the same queries and samples, shown as iteration 0."""
    from slkit.evaluation.reports import benchmark_table, iterations, summary_table

    base = smoke_run / "baseline"
    nb = json.loads((base / "04_evaluation.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"]["iteration"] == 0
    assert not (base / "adapters").exists() and (base / "evaluation.done.json").exists()
    m0 = json.loads((base / "evaluation.json").read_text())
    assert m0["iteration"] == 0 and m0["length_following"]["n"] == 16
    slots = lambda d: [(r["index"], r["sample"], r["query"]) for r in map(json.loads, (d / "benchmark_outputs.jsonl").open())]
    assert sorted(slots(base)) == sorted(slots(smoke_run / "iter_1"))  # same queries, same samples
    assert iterations(smoke_run) == [0, 1, 2]
    assert sorted(benchmark_table(smoke_run)["iteration"].unique()) == [0, 1, 2]
    assert list(summary_table([smoke_run])["iteration"]) == [0, 1, 2]


def test_the_run_and_every_kernel_write_slkit_log_and_the_run_its_environment(smoke_run):
    """`slkit run` (this process) logs each notebook it executes; the stage in the notebook's kernel, another
    process, logs its start and end to the same file."""
    import os
    import re

    log = (smoke_run / "slkit.log").read_text()
    for label in ("baseline evaluation", "iteration 2 training", "length_control (after iteration 2)"):
        [cli] = re.findall(rf"\[pid (\d+)\] {re.escape(label)}: executing", log)
        [start] = re.findall(rf"\[pid (\d+)\] {re.escape(label)}: start", log)
        [end] = re.findall(rf"\[pid (\d+)\] {re.escape(label)}: done in", log)
        assert int(cli) == os.getpid() and start == end != cli
    env = json.loads((smoke_run / "environment.json").read_text())
    assert env["packages"]["torch"] and env["python"] == ".".join(map(str, sys.version_info[:3]))


def test_rerun_skips_finished_stages(smoke_run):
    before = {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*.jsonl")}
    run_loop(smoke_run / "params.yaml", show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in smoke_run.rglob("*.jsonl")} == before


def test_resume_with_changed_params_is_refused(smoke_run):
    with pytest.raises(ParamsError, match=r"sampling.top_p differ.*new run"):
        prepare_run(smoke_run / "params.yaml", {"sampling.top_p": 0.5})


def test_cli_reports_bad_params_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nmodel:\n  path: builtin:tiny-random-llama\nquerys:\n  per_language: 3\n")
    result = subprocess.run([sys.executable, "-m", "slkit", "run", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "bad.yaml:4: querys: unknown key" in result.stderr and "Traceback" not in result.stderr


def test_length_control_stage_runs_after_the_last_iteration(smoke_run):
    from slkit.method.textstats import count_words
    from test_length_control import longen_accepts

    out = smoke_run / "length_control"
    assert json.loads((out / "05_length_control.ipynb").read_text())["metadata"]["papermill"]["parameters"] == {
        "run_dir": str(smoke_run), "iteration": 2}
    records = [json.loads(line) for line in (out / "constrained.jsonl").open()]
    # the resampled sets, as the reference takes them (docs/method.md), and the collection pass's drafts
    sources = ["iter_1/resampled_drafts", "iter_1/resampled_extensions", "iter_2/resampled_drafts",
               "iter_2/resampled_extensions", "length_control/drafts"]
    responses = sum(1 for s in sources for _ in (smoke_run / f"{s}.jsonl").open())
    assert 0 < len(records) <= responses and {r["source"] for r in records} <= set(sources)
    collected = {json.loads(line)["id"] for line in (out / "queries.jsonl").open()}
    assert collected and collected <= {f"collect-q{i}" for i in range(4)}  # collect_queries: 2 per language, 2 languages
    for r in records:  # recomputed here from the text and LonGen's rule: the stage's own check is not trusted
        c = r["constraint"]
        assert r["words"] == count_words(r["completion"]) and 10 <= r["words"] <= 400
        assert longen_accepts(c["kind"], c["low"], c["high"], r["words"]), r
        assert all(10 <= n <= 400 and n % 10 == 0 for n in (c["low"], c["high"]) if n is not None), r
        assert r["original_query"].rstrip("。.") in r["query"]
    assert json.loads((out / "length_control.done.json").read_text())["iteration"] == 2
    metrics = json.loads((out / "length_control.json").read_text())
    before = json.loads((smoke_run / "iter_2" / "evaluation.json").read_text())["length_following"]
    assert metrics["length_before"] == before
    assert 0 <= metrics["length_after"]["overall"] <= 1
    assert metrics["training"]["init_adapter"] == str(smoke_run / "iter_2" / "adapters" / "generator")
    assert (out / "adapters" / "generator" / "adapter_model.safetensors").exists()


def test_compare_puts_runs_side_by_side(smoke_run, tmp_path):
    import shutil

    other = tmp_path / "smoke-copy"
    shutil.copytree(smoke_run, other)
    out = tmp_path / "compare"
    result = subprocess.run([sys.executable, "-m", "slkit", "compare", str(smoke_run), str(other), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    scores, environment = (out / "summary.md").read_text().split("\n## Environment\n\n")
    table = scores.splitlines()
    assert len(table) == 2 + 6  # header, rule, 2 runs x (baseline + 2 iterations)
    assert [line.split(" | ")[0] for line in environment.splitlines()[2:]] == [f"| {smoke_run.name}", "| smoke-copy"]
    assert sum(line.startswith(f"| {smoke_run.name} |") for line in table) == 3
    assert sum(line.startswith("| smoke-copy |") for line in table) == 3
    assert sum(line.startswith(f"| {smoke_run.name} | 0 |") for line in table) == 1  # the base model's row
    for figure in ("lengths", "required_vs_produced", "length_scores", "filter_rates", "distinct_n"):
        assert (out / f"{figure}.png").stat().st_size > 5000, figure
    bad = subprocess.run([sys.executable, "-m", "slkit", "compare", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def _executed(path):
    return json.loads(path.read_text())["cells"]


def _outputs(cell):
    """The text a code cell showed: streams, text/plain, text/markdown and text/html."""
    parts = []
    for out in cell.get("outputs", []):
        parts += out.get("text", [])
        for kind in ("text/plain", "text/markdown", "text/html"):
            value = out.get("data", {}).get(kind, "")
            parts += value if isinstance(value, list) else [value]
    return "".join(parts)


def _section_outputs(cells, heading):
    """The output of the code cells under `## heading`, up to the next `## ` heading."""
    shown, inside = [], False
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and source.startswith("## "):
            inside = source.startswith(f"## {heading}")
        elif inside and cell["cell_type"] == "code":
            shown.append(_outputs(cell))
    return "\n".join(shown)


def test_every_executed_notebook_is_a_lesson_on_its_own_run(smoke_run):
    """Each notebook has the lesson's sections in order, no markdown number that the params could set, and its
    walk-through shows a real record of the run it belongs to."""
    from slkit.lessons import SECTIONS
    from slkit.core.records import read_jsonl

    notebooks = [(smoke_run / f"iter_{k}" / name, k) for k in (1, 2) for name in
                 ("00_queries.ipynb", "01_drafts.ipynb", "02_extensions.ipynb", "03_training.ipynb", "04_evaluation.ipynb")]
    notebooks += [(smoke_run / "baseline" / "04_evaluation.ipynb", 0),
                  (smoke_run / "length_control" / "05_length_control.ipynb", 2)]
    # what each walk-through must show: a record id (or the query of a benchmark output) from the file it reads
    shows = {"00_queries": ("queries.jsonl", "id"), "01_drafts": ("drafts.jsonl", "id"),
             "02_extensions": ("extensions.jsonl", "id"), "03_training": ("resampled_extensions.jsonl", "id"),
             "04_evaluation": ("benchmark_outputs.jsonl", "query"), "05_length_control": ("constrained.jsonl", "id")}
    for path, k in notebooks:
        cells = _executed(path)
        headings = [line[3:] for c in cells if c["cell_type"] == "markdown"
                    for line in "".join(c["source"]).splitlines() if line.startswith("## ")]
        assert [h for h in headings if h in SECTIONS] == list(SECTIONS), path
        # numbers in prose come from the params: the only digits of a lesson's markdown are in its title and its
        # formulas (whose params are symbols, their values shown by a code cell)
        prose = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
        prose[0] = prose[0].split("\n", 1)[1]
        assert not any(ch.isdigit() and ch.isascii() for text in prose for ch in without_math(text)), path
        assert "extensions.micro_iterations" in _section_outputs(cells, "This run's params") or \
            path.stem != "02_extensions"
        # the rule's code, read from slkit, and a command for every "try this"
        assert "```python" in _section_outputs(cells, "The idea"), path
        tries = _section_outputs(cells, "Try this")
        assert tries.count("slkit run ") >= 2 and f"--set run_name={smoke_run.name}-" in tries, path
        name, field = shows[path.stem]
        records = read_jsonl(path.parent / name)
        walkthrough = _section_outputs(cells, "One item, step by step")
        assert records and any(str(r[field]) in walkthrough for r in records), (path, walkthrough[:500])
    # the extension walk-through goes micro-iteration by micro-iteration through a record's recorded texts
    for k in (1, 2):
        cells = _executed(smoke_run / f"iter_{k}" / "02_extensions.ipynb")
        walkthrough = _section_outputs(cells, "One item, step by step")
        shown = [r for r in read_jsonl(smoke_run / f"iter_{k}" / "extensions.jsonl") if f"`{r['id']}`" in walkthrough]
        assert shown and shown[0]["micro_iterations"]
        assert all(r["continuation"].strip()[:40] in walkthrough for r in shown[0]["micro_iterations"][:4])
        # the length rule's figure, drawn in the notebook
        looked = [c for c in cells if c["cell_type"] == "code" and "length_rule_figure" in "".join(c["source"])]
        assert looked and any("image/png" in out.get("data", {}) for out in looked[0]["outputs"])


def test_the_readme_lessons_block_is_made_from_a_run(smoke_run, tmp_path):
    """tools/lessons_readme.py: one example per notebook, taken from the run's records, replaces the README's block."""
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- lessons:begin -->\nold\n<!-- lessons:end -->\nrest\n")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "lessons_readme.py"), str(smoke_run),
                           "--readme", str(readme)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("intro\n<!-- lessons:begin -->\n") and text.endswith("<!-- lessons:end -->\nrest\n")
    assert "old" not in text
    for notebook in ("00_queries", "01_drafts", "02_extensions", "03_training", "04_evaluation", "05_length_control"):
        assert f"**{notebook}**" in text
    ids = {json.loads(line)["id"] for line in (smoke_run / "iter_2" / "extensions.jsonl").read_text().splitlines()}
    shown = re.search(r"\*\*02_extensions\*\*: the micro-iterations of extension `([^`]+)`", text)
    assert shown and shown.group(1) in ids  # a real record of the run's last iteration
    assert (tmp_path / "docs" / "lessons" / "required_vs_produced.png").stat().st_size > 1000


def test_the_docs_lessons_are_the_runs_notebooks_without_the_machine(smoke_run, tmp_path):
    """tools/lessons.py: the six executed notebooks of the run's last iteration and final stage, copied when their
    cells are notebooks/' and executed again on the finished run when not, with no absolute path of the machine."""
    import shutil

    run = tmp_path / "runs" / smoke_run.name
    shutil.copytree(smoke_run, run)
    stale = run / "iter_2" / "00_queries.ipynb"  # as if notebooks/00_queries.ipynb had changed since the run
    notebook = json.loads(stale.read_text())
    notebook["cells"][0]["source"] = ["# an older title\n"]
    stale.write_text(json.dumps(notebook))
    out = tmp_path / "lessons"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "lessons.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "00_queries.ipynb: executed again on the finished run" in done.stdout
    assert done.stdout.count("copied from the run") == 5
    names = ["00_queries", "01_drafts", "02_extensions", "03_training", "04_evaluation", "05_length_control"]
    assert sorted(p.stem for p in out.glob("*.ipynb")) == names
    for name in names:
        text = (out / f"{name}.ipynb").read_text()
        assert str(run) not in text and str(REPO) not in text and str(tmp_path) not in text, name
        notebook = json.loads(text)
        [injected] = [c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert f'run_dir = "runs/{run.name}"' in "".join(injected["source"]), name
        current = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text())
        assert notebook["cells"][0]["source"] == current["cells"][0]["source"], name
        assert all(c["execution_count"] for c in notebook["cells"] if c["cell_type"] == "code"), name
        assert str(smoke_run) not in text, name  # where the run ran, before it was copied
    assert "[02_extensions](02_extensions.ipynb)" in (out / "README.md").read_text()
