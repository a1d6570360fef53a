"""The lessons' showing functions on records with known content, and the records they need: every extension
micro-iteration in extensions.jsonl, the prompt and verdicts of every query; the source they show, the "try this"
commands of every notebook (each checked as `slkit check` reads it, on the demo and the smoke recipe), the
length-rule figure, and the lessons' markdown. The notebooks themselves run in tests/test_pipeline.py (the smoke
run)."""
import ast
import importlib.util
import inspect
import json
import random
import re
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO, ScriptedEngine
from slkit.lessons import figure_image, params_table, quality_table, show_source, symbols, try_this
from slkit.lessons import evaluation as evaluation_lesson
from slkit.lessons import extensions as extensions_lesson
from slkit.lessons import length_control as length_control_lesson
from slkit.lessons import queries as queries_lesson
from slkit.lessons import training as training_lesson
from slkit.method.extensions import extend_drafts, keep_head
from slkit.method.prompts import self_instruct_list, self_instruct_prompt
from slkit.method.quality import quality_failure
from slkit.method.queries import synthesize_queries
from slkit.method.textstats import count_words
from slkit.method.training_sets import drop_lines, extender_examples
from slkit.core.params import ParamsError, dump_params, load_params, params_from_dict
from slkit.core.records import RecordWriter
from slkit.running.cli import main as slkit_main
from test_extensions import PhasedEngine


def _params(**sections):
    return params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"}, **sections})


DRAFT = {"id": "it1-q0-d0", "query_id": "it1-q0", "query": "Write about rivers.", "language": "en",
         "draft": "Rivers run far.\n\nThey feed the sea.", "words": 7}


CONTINUATIONS = ["one two three four.", "and then it never ends", " ".join(f"c{i}" for i in range(15)) + ".",
                 "short."]


def _scripted_extension(tmp_path):
    """One job of two micro-iterations and two tries: try 1 accepts micro-iteration 1, rejects 2 (unfinished) and
    ends below the length rule; try 2 accepts micro-iteration 1 and rejects 2 as not longer, and is kept."""
    phase1_calls = {"n": 0}
    continuations = iter(CONTINUATIONS)

    def phase1(request):
        phase1_calls["n"] += 1
        n = phase1_calls["n"]
        return f"Head {n} alpha.\n\nHead {n} beta.\n\nHead {n} gamma."  # 3 paragraphs: 2 kept

    engine = PhasedEngine(phase1, lambda request: next(continuations))
    params = _params(extensions={"micro_iterations": 2, "max_tries": 2, "samples_per_draft": 1, "min_ratio": 2.0})
    writer = RecordWriter(tmp_path / "extensions.jsonl")
    extend_drafts(engine, [DRAFT], params, 1, writer, params.quality)
    [record] = writer.finish()
    return engine, params, record


def test_an_extension_record_holds_every_micro_iteration_the_engine_wrote(tmp_path):
    engine, _, record = _scripted_extension(tmp_path)
    phase1 = [f"Head {n} alpha.\n\nHead {n} beta.\n\nHead {n} gamma." for n in range(1, 5)]
    trace = record["micro_iterations"]
    assert [(r["try_index"], r["micro_iteration"]) for r in trace] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [r["phase1"] for r in trace] == phase1
    assert [r["continuation"] for r in trace] == CONTINUATIONS
    assert [r["kept_paragraphs"] for r in trace] == [2, 2, 2, 2]
    assert [r["verdict"] for r in trace] == ["accepted", "unfinished", "accepted", "not_longer"]
    # words of kept head (6 words) + continuation
    assert [r["words"] for r in trace] == [10, 11, 21, 7]
    assert record["tries"] == 2 and record["words"] == 21 and record["micro_iterations_accepted"] == 1


def test_an_extension_record_of_an_older_run_reads_under_todays_names(tmp_path):
    """extensions.jsonl written before the renames (attempts, rounds, rounds_accepted; attempt, round, stage1 in
    each entry): the training stage and the lessons read it as if written today."""
    _, _, record = _scripted_extension(tmp_path)
    renamed = ("tries", "micro_iterations_accepted", "micro_iterations", "try_index", "micro_iteration", "phase1")
    old = {k: v for k, v in record.items() if k not in renamed}
    old.update(attempts=record["tries"], rounds_accepted=record["micro_iterations_accepted"],
               rounds=[{"attempt": e["try_index"], "round": e["micro_iteration"], "stage1": e["phase1"],
                        **{k: v for k, v in e.items() if k not in renamed}} for e in record["micro_iterations"]])
    (tmp_path / "extensions.jsonl").write_text(json.dumps(old) + "\n")
    assert extensions_lesson.kept_extensions(tmp_path) == [record]


def test_replay_rebuilds_the_prompts_and_prefills_the_extender_saw(tmp_path):
    engine, _, record = _scripted_extension(tmp_path)
    shown = extensions_lesson.replay(record)
    for r, request in zip(shown, engine.by_phase[1]):
        assert request.prompt == engine.render(r["phase1_prompt"])
    for r, request in zip(shown, engine.by_phase[2]):
        assert request.prompt == engine.render(r["phase2_prompt"]) and request.prefill == r["prefill"]
    # each try starts from the draft; an accepted micro-iteration's text is the next one's input
    assert [r["input"] for r in shown] == [DRAFT["draft"], shown[0]["new_text"], DRAFT["draft"], shown[2]["new_text"]]
    assert shown[0]["kept"] == "Head 1 alpha.\n\nHead 1 beta."
    assert [r["best_before"] for r in shown] == [7, 10, 7, 21]
    table = extensions_lesson.micro_iterations_table(record)
    assert list(table["verdict"]) == ["accepted", "unfinished", "accepted", "not_longer"]
    assert list(table["kept paragraphs"]) == ["2 of 3"] * 4


def test_the_extension_walkthrough_shows_each_micro_iteration_and_the_length_rule(tmp_path):
    _, params, record = _scripted_extension(tmp_path)
    text = extensions_lesson.walkthrough(record, params).data
    assert f"Record `{record['id']}`" in text
    for r in record["micro_iterations"]:
        assert r["phase1"] in text and r["continuation"] in text
    assert "verdict: unfinished" in text and "verdict: not_longer" in text
    assert "21 words > 2.0 x 7 = 14.0: kept" in text
    summary = {"drafts": 3, "resampled_drafts": 2, "jobs": 2, "extensions": 1,
               "counts": {"gave_up": 1, "retried": 3, "micro_iteration_accepted": 2,
                          "micro_iteration_rejected_repetition": 5}}
    assert "1 gave up" in extensions_lesson.jobs_summary(summary).data
    verdicts = {"rejected_repetition": 5, "accepted": 2}
    assert extensions_lesson.micro_iteration_verdicts(summary)["micro-iterations"].to_dict() == verdicts
    older = {**summary, "counts": {"gave_up": 1, "retried": 3, "round_accepted": 2, "round_rejected_repetition": 5}}
    assert extensions_lesson.micro_iteration_verdicts(older)["micro-iterations"].to_dict() == verdicts


def test_a_query_record_holds_its_prompt_completion_and_judge_answer(tmp_path):
    params = _params(queries={"per_language": 1, "languages": ["en"], "max_tries": 3})
    completions = iter([" Write.", " Explain how tides work, in depth.", " Describe the history of glassmaking in Venice at length.\nInstruction 4: x"])
    judge = iter(["no", " yes"])

    def answer(request):
        return next(judge) if request.prompt.endswith("Answer:") else next(completions)

    engine = ScriptedEngine(answer)
    pool = [{"query": q, "language": "en"} for q in ("Write a long guide to tea.", "Draft a detailed plan for Kyoto.",
                                                     "Tell the story of a lighthouse keeper.")]
    writer = RecordWriter(tmp_path / "queries.jsonl")
    synthesize_queries(engine, pool, [], params, 1, writer)
    [record] = writer.finish()
    prompts = [r.prompt for r in engine.requests if not r.prompt.endswith("Answer:")]
    assert record["tries"] == 3 and self_instruct_prompt(record["exemplars"], "en") == prompts[2]
    assert record["completion"] == " Describe the history of glassmaking in Venice at length.\nInstruction 4: x"
    assert record["judge_answer"] == " yes"
    text = queries_lesson.walkthrough(tmp_path, params).data
    assert "Record `it1-q0`" in text and self_instruct_list(record["exemplars"], "en") in text
    assert record["completion"] in text
    assert "read as yes: kept" in text


def test_quality_table_shows_the_failing_check_and_the_verdict():
    params = _params()
    looping = "A river runs to the sea and the sea is wide. " * 2 + "Here is the revised version."
    table = quality_table(looping, "en", params.quality)
    assert table.loc["verdict", "what it saw"] == quality_failure(looping, "en", params.quality) == "repetition"
    assert not table.loc["no repeated 10-gram", "passed"]
    assert table.loc["no repeated 10-gram", "what it saw"].startswith("first repeated: A river runs")
    assert table.loc["no meta-talk at the edges", "what it saw"] == "revised, version"
    assert table.loc["ends cleanly", "passed"]


def test_params_table_shows_this_runs_value_beside_the_reference():
    table = params_table(_params(extensions={"micro_iterations": 2}), "extensions")
    assert table.loc["extensions.micro_iterations", "this run"] == "2"
    assert table.loc["extensions.micro_iterations", "reference"] == "3"
    assert table.loc["extensions.micro_iterations", "changed"]
    assert not table.loc["extensions.min_ratio", "changed"]
    assert {"resampling.coefficient", "quality.ngram_en", "sampling.top_p"} <= set(table.index)


def test_dropped_lines_are_the_draft_lines_missing_from_the_extender_prompt():
    draft = "\n".join(f"Line {i} of the draft." for i in range(12))
    item = {"id": "x", "query": "Write.", "language": "en", "draft": draft, "extended": "Longer."}
    [example] = extender_examples([item], 0.6, random.Random(3))
    kept = drop_lines(draft, 0.6, random.Random(3)).split("\n")
    expected = [line for line in draft.split("\n") if line not in kept]
    assert expected and training_lesson.dropped_lines(draft, example["prompt"], "Write.", "en") == expected


def test_the_length_score_is_shown_by_its_formula():
    below = {"words": 50, "interval": [80, 120], "score": 0.25, "required": 100}
    above = {"words": 150, "interval": [80, 120], "score": 0.5, "required": 100}
    assert evaluation_lesson.score_steps(below) == "L = 50 < a = 80: max(2 x 50 / 80 - 1, 0) = 0.250 (recorded: 0.250)"
    assert evaluation_lesson.score_steps(above).endswith("max(3 - 2 x 150 / 120, 0) = 0.500 (recorded: 0.500)")
    # A LongBench-Write output is written with "interval": null (the schema writes every field): its own formula.
    longbench = {"words": 100, "interval": None, "score": 100.0, "required": 100}
    assert evaluation_lesson.score_steps(longbench).startswith("y = 100, x = 100")
    assert length_control_lesson.describe({"kind": "about", "low": 100, "high": None}) == \
        "about 100 (accepted interval [80, 120])"
    assert count_words("one two") == 2


NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def without_math(text: str) -> str:
    """Markdown with its formulas ($...$ and $$...$$) left out: a formula's own constants (the half of the former
    part, LonGen's 0.8 T) belong to the method, while its params appear in it as symbols."""
    return re.sub(r"\$\$.+?\$\$|\$[^$\n]+?\$", "", text, flags=re.S)


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _section(cells, heading):
    """The cells under a `## heading` of a notebook, to the next `## `."""
    inside, found = False, []
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and source.startswith("## "):
            inside = source.startswith(f"## {heading}")
        if inside:
            found.append(cell)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_lesson_states_its_rules_as_formulas_and_shows_the_code_that_applies_them(path):
    cells = _cells(path)
    idea = _section(cells, "The idea")
    markdown = "\n".join("".join(c["source"]) for c in idea if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in idea if c["cell_type"] == "code")
    assert "### The rule" in markdown and "$$" in markdown, path.name  # a displayed formula
    assert "symbols(params," in code and "show_source(" in code, path.name
    # numbers in prose come from the params: the only digits of a lesson's markdown are in its title and formulas
    prose = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    prose[0] = prose[0].split("\n", 1)[1]
    assert not [ch for text in prose for ch in without_math(text) if ch.isdigit() and ch.isascii()], path.name
    tries = [c for c in _section(cells, "Try this") if c["cell_type"] == "code"]
    assert len(tries) >= 2 and all("try_this(run_dir," in "".join(c["source"]) for c in tries), path.name


def test_without_math_keeps_prose_and_drops_formulas():
    assert without_math("keep $U > c z^{e}$ when $$W > 1.2 x$$ holds") == "keep  when  holds"


def test_show_source_shows_slkit_code_as_it_is_in_its_file():
    shown = show_source(keep_head).data
    lines, first = inspect.getsourcelines(keep_head)
    assert f"(slkit/method/extensions.py, lines {first}-{first + len(lines) - 1})" in shown
    assert "```python\n" + "".join(lines).rstrip("\n") + "\n```" in shown
    excerpt = show_source(extend_drafts, start="if best_words > ep.min_ratio", end="counts[\"accepted\"] += 1").data
    code = excerpt.split("```python\n")[1].split("\n```")[0]
    assert code.startswith('if best_words > ep.min_ratio * d["words"]:') and code.endswith('counts["accepted"] += 1')
    assert "for try_index" not in code  # only the lines asked for, dedented
    with pytest.raises(ValueError, match="no line"):
        show_source(keep_head, start="no such line")
    assert show_source(keep_head, extend_drafts).data.count("```python") == 2


@pytest.fixture
def run_dirs(tmp_path):
    """A run directory per recipe, holding only the params it would have started with."""
    dirs = {}
    for recipe in ("demo", "smoke"):
        run_dir = tmp_path / "runs" / recipe
        run_dir.mkdir(parents=True)
        dump_params(load_params(REPO / "params" / f"{recipe}.yaml"), run_dir / "params.yaml")
        dirs[recipe] = run_dir
    return dirs


def _check(command, capsys):
    """`slkit check` on a shown `slkit run` command: its exit status."""
    argv = shlex.split(command)
    assert argv[:2] == ["slkit", "run"]
    status = slkit_main(["check"] + argv[2:])
    capsys.readouterr()
    return status


def test_try_this_shows_a_command_that_slkit_check_accepts(run_dirs, capsys):
    run_dir = run_dirs["demo"]
    shown = try_this(run_dir, "more-micro-iterations", {"extensions.micro_iterations": 2,
                                              "length_control.proportions": {"about": 0.7, "range": 0.1, "above": 0.1,
                                                                             "below": 0.1}}).data
    command = re.fullmatch(r"```bash\n(.+)\n```", shown).group(1)
    assert command.startswith(f"slkit run {run_dir / 'params.yaml'} --set run_name=demo-more-micro-iterations ")
    assert "--set extensions.micro_iterations=2 " in command
    assert _check(command, capsys) == 0
    assert shlex.split(command).count("--set") == 3
    assert load_params(run_dir / "params.yaml").extensions.micro_iterations == 1  # the run's own params untouched
    with pytest.raises(ValueError, match="this run's values already"):
        try_this(run_dir, "same", {"extensions.micro_iterations": 1})
    with pytest.raises(ParamsError, match="extensions.no_such_key"):
        try_this(run_dir, "typo", {"extensions.no_such_key": 3})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_try_this_of_a_lesson_is_a_command_slkit_check_accepts(path, run_dirs, capsys):
    """The notebook's import cell and its Try this cells, run on each recipe's params: every command they show
    passes `slkit check` and names a new run."""
    cells = _cells(path)
    [imports] = [c for c in cells if c["cell_type"] == "code" and "setup(run_dir" in "".join(c["source"])]
    tries = [c for c in _section(cells, "Try this") if c["cell_type"] == "code"]
    for recipe, run_dir in run_dirs.items():
        namespace = {"run_dir": str(run_dir), "iteration": 1}
        exec("".join(imports["source"]), namespace)
        shown = []
        for cell in tries:
            tree = ast.parse("".join(cell["source"]))
            last = tree.body.pop()
            exec(compile(tree, path.name, "exec"), namespace)
            shown.append(eval(compile(ast.Expression(last.value), path.name, "eval"), namespace).data)
        names = set()
        for markdown in shown:
            command = re.fullmatch(r"```bash\n(.+)\n```", markdown).group(1)
            assert _check(command, capsys) == 0, (recipe, command)
            names.add(re.search(r"--set run_name=(\S+)", command).group(1))
        assert len(names) == len(shown) and recipe not in names, names


def test_symbols_show_each_symbols_param_this_runs_value_and_the_reference():
    table = symbols(_params(extensions={"min_ratio": 1.5}),
                    {"ρ": "extensions.min_ratio", "π": "length_control.proportions",
                     "K": ("drafts.max_new_tokens, else sampling.max_new_tokens",
                           lambda p: p.drafts.max_new_tokens or p.sampling.max_new_tokens)})
    assert table.loc["ρ", "param"] == "extensions.min_ratio"
    assert (table.loc["ρ", "this run"], table.loc["ρ", "reference"]) == ("1.5", "1.2")
    assert table.loc["π", "this run"] == str({"about": 0.4, "range": 0.25, "above": 0.1, "below": 0.25})
    assert table.loc["K", "this run"] == table.loc["K", "reference"] == "16384"


def test_the_length_rule_figure_draws_every_try_against_the_line():
    def record(id_, draft, words, trace):
        return {"id": id_, "language": "en", "draft_words": draft, "words": words,
                "tries": max(t for t, _, _ in trace),
                "micro_iterations": [{"try_index": t, "micro_iteration": 1, "words": w, "verdict": v}
                                     for t, w, v in trace]}

    records = [record("a", 100, 150, [(1, 110, "accepted"), (2, 150, "accepted")]),  # 110 < 1.2 x 100: again
               record("b", 50, 70, [(1, 90, "repetition"), (2, 70, "accepted")]),  # try 1 kept nothing
               record("c", 80, 120, [(1, 120, "accepted")])]
    table = extensions_lesson.tries(records)
    assert table[["id", "try", "draft words", "extended words", "outcome"]].values.tolist() == [
        ["a", 1, 100, 110, "below the rule: started again"], ["a", 2, 100, 150, "kept"],
        ["b", 1, 50, 50, "below the rule: started again"], ["b", 2, 50, 70, "kept"], ["c", 1, 80, 120, "kept"]]
    rejected = extensions_lesson.rejected_micro_iterations(records)
    assert rejected[["id", "draft words", "words", "verdict"]].values.tolist() == [["b", 50, 90, "repetition"]]
    fig = extensions_lesson.length_rule_figure(table, 1.2, rejected)
    [ax] = fig.axes
    rule = [line for line in ax.get_lines() if "length rule" in line.get_label()]
    (x0, x1), (y0, y1) = rule[0].get_xdata(), rule[0].get_ydata()
    assert y0 == 0 and y1 / x1 == pytest.approx(1.2)
    points = sum(len(c.get_offsets()) for c in ax.collections)
    assert points == len(table) + len(rejected)
    assert [t.get_text() for t in ax.texts] == ["repetition"]
    assert ax.get_ylim()[1] > 90  # every point inside the axes
    png = figure_image(fig).data
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def _lessons_tool():
    spec = importlib.util.spec_from_file_location("lessons_tool", REPO / "tools" / "lessons.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_copies_name_no_path_or_secret_of_the_machine(tmp_path, monkeypatch):
    """tools/lessons.py's scrubbing: this machine's repository, Python, home and secrets, and the directories of the
    machine the run ran on (a run copied from elsewhere), read from its params.yaml and environment.json."""
    tool = _lessons_tool()
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz123456")
    run_dir = tmp_path / "copied" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text("run_name: demo\noutput_dir: /srv/elsewhere/repo/runs\n")
    (run_dir / "environment.json").write_text(json.dumps(
        {"executable": "/opt/other/.venv/bin/python", "slkit": {"source": "/srv/elsewhere/repo"}}))
    text = (f'run_dir = "{run_dir}"\n{REPO}/slkit/method/quality.py\n{sys.prefix}/bin/python\n'
            f'{Path.home()}/.cache/slkit/models\ntoken hf_abcdefghijklmnopqrstuvwxyz123456\n{REPO}\n'
            'ran in /srv/elsewhere/repo/runs/demo/iter_1 with /opt/other/.venv/bin/python from /srv/elsewhere/repo\n')
    scrubbed = tool.scrub(text, tool.replacements(run_dir))
    assert scrubbed == ('run_dir = "runs/demo"\nslkit/method/quality.py\n<venv>/bin/python\n~/.cache/slkit/models\n'
                        'token <HF_TOKEN redacted>\n.\nran in runs/demo/iter_1 with <venv>/bin/python from .\n')
    assert not tool.LEAKS.search(scrubbed)
    assert tool.LEAKS.findall("see /home/someone/x.txt and /tmp/y") == ["/home/someone/x.txt", "/tmp/y"]
    assert tool.LEAKS.search("hf_" + "a" * 30) and not tool.LEAKS.search("docs/lessons/x and runs/demo/params.yaml")


def test_the_loss_figure_draws_each_adapters_steps():
    summary = {"generator": {"losses": [2.0, 1.5, 1.2]}, "extender": {"losses": [1.0]}}
    losses = training_lesson.losses(summary)
    assert losses.values.tolist() == [["generator", 1, 2.0], ["generator", 2, 1.5], ["generator", 3, 1.2],
                                      ["extender", 1, 1.0]]
    [ax] = training_lesson.loss_figure(losses).axes
    assert all(tick == int(tick) for tick in ax.get_xticks())
    assert sorted(len(line.get_xdata()) for line in ax.get_lines())[-1] == 3  # the generator's three steps
