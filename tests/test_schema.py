"""The schema of the files the stages write (slkit/core/schema.py): a record with a missing or misspelt field
fails where it is written, a reader of a record lacking a field fails naming file:line:field, every file a run
writes is in the schema, and the README's file table is the schema's."""
import ast
import json
import re

import pytest

from conftest import REPO, ScriptedEngine
from slkit.core.records import RecordFileError, RecordWriter, mark_done, write_jsonl_atomic
from test_stages import BENCHMARK, _answer

DRAFT = {"id": "q0-d0", "query_id": "q0", "query": "Write long.", "language": "en", "sample": 0,
         "draft": "A draft.", "words": 2, "tries": 1}


def test_a_record_with_a_misspelt_field_fails_at_the_writer_and_is_not_written(tmp_path):
    path = tmp_path / "iter_1" / "drafts.jsonl"
    path.parent.mkdir()
    with RecordWriter(path) as writer:
        writer.write(DRAFT)
        misspelt = {**DRAFT, "id": "q0-d1", "sample": 1}
        misspelt["drfat"] = misspelt.pop("draft")
        with pytest.raises(RecordFileError, match=r"drafts.jsonl.partial:2: draft: Field required; "
                                                  r"drfat: Extra inputs are not permitted \(DraftRecord\)"):
            writer.write(misspelt)
    assert [json.loads(line)["id"] for line in path.with_name("drafts.jsonl.partial").read_text().splitlines()] == [
        "q0-d0"]


def test_a_training_set_lacking_a_field_fails_before_the_file_is_touched(tmp_path):
    path = tmp_path / "generator_sft.jsonl"
    with pytest.raises(RecordFileError, match=r"generator_sft.jsonl:2: completion: Field required"):
        write_jsonl_atomic(path, [{"id": "a", "prompt": "p", "completion": "c"}, {"id": "b", "prompt": "p"}])
    assert not path.exists() and not path.with_name("generator_sft.jsonl.tmp").exists()


def test_a_done_marker_whose_summary_lacks_a_field_is_not_written(tmp_path):
    with pytest.raises(RecordFileError, match=r"drafts.done.json: summary: rejected: Field required \(DoneMarker\)"):
        mark_done(tmp_path, "drafts", {"drafts": 3, "capped": {"outputs": 3, "cut": 0, "share": 0.0, "by_max_new_tokens": {}}})
    assert not (tmp_path / "drafts.done.json").exists()


def _written_records(node):
    """The record argument of a call that writes to a file: writer.write(x), write_jsonl_atomic(path, x),
    write_json_atomic(path, x), mark_done(dir, stage, x)."""
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    position = {"write": 0, "write_jsonl_atomic": 1, "write_json_atomic": 1, "mark_done": 2}.get(name)
    return [node.args[position]] if position is not None and len(node.args) > position else []


def test_no_writer_in_slkit_writes_a_dict_literal():
    """Writers build records through their type, so a misspelt field fails on the line that writes it: no
    {...} literal (or list of them) is handed to a writer."""
    found = []
    for path in (REPO / "slkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for arg in _written_records(node):
                    inner = arg.elt if isinstance(arg, ast.ListComp) else arg
                    if isinstance(inner, ast.Dict) or (isinstance(arg, ast.List) and any(
                            isinstance(e, ast.Dict) for e in arg.elts)):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A smoke run directory whose stages generate with a scripted engine and train stand-in adapters."""
    from slkit.running.pipeline import prepare_run
    from slkit.core.records import read_jsonl, write_json_atomic

    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters=None: ScriptedEngine(_answer))

    def fake_train(params, examples_path, output_dir, init_adapter=None):
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "adapter_config.json").write_text("{}")
        summary = {"samples": len(read_jsonl(examples_path)), "trained": False, "init_adapter": init_adapter}
        write_json_atomic(output_dir / "slkit-train.json", summary)
        return summary

    monkeypatch.setattr("slkit.stages.training.train_adapter", fake_train)
    monkeypatch.setattr("slkit.stages.length_control.train_adapter", fake_train)
    monkeypatch.setattr("slkit.stages.evaluation.write_iteration_figures", lambda *a: [])
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path), "macro_iterations": 1, "evaluation.benchmark": str(BENCHMARK),
        "evaluation.judge.enabled": True, "length_control.collect_queries": 1})
    return run_dir


def test_every_file_a_run_writes_is_in_the_schema_and_reads_back_as_its_type(run_dir):
    from slkit.core.records import read_document, read_records
    from slkit.core.registry import ITERATION_STAGES
    from slkit.core.schema import run_file
    from slkit.stages.evaluation import evaluation_stage
    from slkit.stages.length_control import length_control_stage

    evaluation_stage(run_dir, 0)
    for stage in ITERATION_STAGES:
        getattr(__import__(f"slkit.stages.{stage}", fromlist=["_"]), f"{stage}_stage")(run_dir, 1)
    length_control_stage(run_dir, 1)
    # the adapters' own files (adapter_config.json) are PEFT's, beside slkit-train.json
    written = sorted(p for p in run_dir.rglob("*") if p.suffix in (".json", ".jsonl")
                     and (p.parent.parent.name != "adapters" or p.name == "slkit-train.json"))
    names = {p.name for p in written}
    assert {"judgements.jsonl", "constrained.jsonl", "slkit-train.json", "length_control.done.json",
            "after_iteration.json", "progress.json"} <= names
    for path in written:
        entry = run_file(path)
        assert entry is not None, f"{path.relative_to(run_dir)} is not in slkit.core.schema.FILES"
        records = [read_document(path, entry.record)] if path.suffix == ".json" else read_records(path, entry.record)
        assert records, path


def test_a_reader_of_a_record_lacking_a_field_names_file_line_and_field(run_dir):
    from slkit.stages.extensions import extensions_stage

    drafts = run_dir / "iter_1" / "drafts.jsonl"
    drafts.parent.mkdir(parents=True)
    lacking = {k: v for k, v in DRAFT.items() if k != "draft"}
    drafts.write_text(json.dumps(DRAFT) + "\n" + json.dumps({**lacking, "id": "q0-d1"}) + "\n")
    with pytest.raises(RecordFileError, match=rf"{re.escape(str(drafts))}:2: draft: Field required \(DraftRecord\)"):
        extensions_stage(run_dir, 1)


def test_a_done_marker_lacking_a_summary_field_names_the_file_and_field(run_dir):
    """A stage whose done-marker is read (resume, reports) gets the marker checked, not a KeyError later."""
    from slkit.stages.drafts import drafts_stage

    marker = run_dir / "iter_1" / "drafts.done.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"stage": "drafts", "finished_at": 0.0, "summary": {"drafts": 1}}))
    with pytest.raises(RecordFileError, match=rf"{re.escape(str(marker))}: summary: rejected: Field required"):
        drafts_stage(run_dir, 1)


def test_every_field_has_a_description_and_every_stage_a_summary_type():
    from slkit.core.registry import STAGES
    from slkit.core.schema import FILES, STAGE_SUMMARIES, Record

    def types(record):
        yield record
        for field in record.model_fields.values():
            for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, Record):
                    yield from types(arg)

    for record in {t for f in FILES for t in types(f.record)} | {t for s in STAGE_SUMMARIES.values() for t in types(s)}:
        for name, field in record.model_fields.items():
            assert field.description and "\n" not in field.description, f"{record.__name__}.{name}"
    assert set(STAGE_SUMMARIES) == {s.name for s in STAGES}
    # every file the stage registry says a stage writes is in the schema
    names = {f.name for f in FILES}
    assert {w for s in STAGES for w in s.writes if w.endswith((".json", ".jsonl"))} <= names


def _readme_section():
    readme = (REPO / "README.md").read_text()
    return readme.split("## What a run writes\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_file_table_is_the_schema():
    from slkit.core.schema import file_table

    section = _readme_section()
    assert section.split("<!-- files:begin -->\n", 1)[1].split("\n<!-- files:end -->", 1)[0] == file_table()


def test_every_file_the_readme_lists_is_in_the_schema_and_back():
    from slkit.core.schema import FILES

    tree = _readme_section().split("```", 2)[1]
    listed = set(re.findall(r"[\w<>.-]+\.jsonl?\b", tree))
    # environment.json is written by `slkit run` itself before any stage (slkit.running.environment), like
    # params.yaml and run.lock: the stages' schema does not cover it; nor engine.json, the run's server
    # (slkit.engines.server), there while it runs.
    assert listed - {"environment.json", "engine.json"} == {f.name for f in FILES}
