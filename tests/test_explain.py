"""Params documented as data: every field says what it is, its unit and the method's value; `slkit check
--explain` prints them beside a recipe's values; `slkit check --set` takes `slkit run`'s overrides."""
import re

import pytest
import yaml
from pydantic import BaseModel

from conftest import REPO
from slkit.running.cli import main
from slkit.running.explain import all_settings, markdown, settings
from slkit.core.params import NO_REFERENCE

# The fields whose default is not the method's value, and why (each description says it too).
DEPARTURES = {
    "quality.meta_words": "slkit's extension template's nouns and a Chinese list, which the reference lacks",
    "length_control.enabled": "the final stage is a separate long step, off unless a recipe turns it on",
}


@pytest.fixture
def minimal_recipe(tmp_path):
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text("run_name: minimal\nmodel:\n  path: builtin:tiny-random-llama\ntraining:\n  lora_r: 8\n")
    return recipe


def test_every_field_has_a_description_and_a_unit():
    found = all_settings()
    keys = {s.key for s in found}
    # the walk reaches nested sections, and sections that may be None (judge.model is a ModelParams)
    assert {"engine.vllm.max_loras", "evaluation.judge.max_tries", "evaluation.judge.model.path"} <= keys
    bare = [s.key for s in found if not s.description.strip() or not s.unit]
    assert not bare, f"params fields without a description or a unit (declare them with `setting`): {bare}"


def test_a_bare_field_is_seen_as_one():
    class Section(BaseModel):
        documented: int = 1

    (s,) = settings(Section)
    assert s.unit is None and s.description == "" and s.reference is NO_REFERENCE


def test_each_default_is_the_methods_value_or_the_description_says_why():
    differing = {s.key: s for s in all_settings() if s.reference is not NO_REFERENCE and s.default != s.reference}
    assert set(differing) == set(DEPARTURES), "a default that is not the method's value: add it to DEPARTURES"
    for s in differing.values():
        assert "reference" in s.description, f"{s.key}: the description must say how it departs from the reference"


def _row(out, key):
    """The table row of `key` and the line after it (the description's first line)."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if re.match(rf"^  [ *][ !]  {re.escape(key)}\s", line))
    return lines[i], lines[i + 1]


def test_explain_shows_value_default_reference_unit_and_description(minimal_recipe, capsys):
    assert main(["check", str(minimal_recipe), "--explain", "--set", "training.lora_r=16"]) == 0
    out = capsys.readouterr().out
    row, description = _row(out, "training.lora_r")
    assert row.split() == ["*!", "training.lora_r", "16", "8", "8", "rank"]  # changed: not the default nor the method's
    assert description.strip() == "LoRA rank."
    row, _ = _row(out, "training.lora_alpha")
    assert row.split() == ["training.lora_alpha", "16", "16", "16", "none"]  # unchanged: no marks
    row, description = _row(out, "engine.vllm.max_num_seqs")  # a nested section; slkit's own: no reference
    assert row.split() == ["engine.vllm.max_num_seqs", "256", "256", "none", "sequences"]
    assert description.strip() == "Sequences decoded together."
    assert "training: LoRA training of the Generator and the Extender" in out  # grouped under the section's title
    # a value cut in the table is shown in full below its description, once: default and reference equal it
    stop = '["\\n\\n---", "\\n\\n\\n", "\\n---", "---"]'
    assert f"value: {stop}" in out and f"default: {stop}" not in out and f"reference: {stop}" not in out
    row, _ = _row(out, "run_name")
    assert row.split() == ["run_name", '"minimal"', "required", "none", "none"]


def test_explain_marks_a_value_that_differs_only_from_the_reference(minimal_recipe, capsys):
    assert main(["check", str(minimal_recipe), "--explain", "--set", "length_control.enabled=true"]) == 0
    row, _ = _row(capsys.readouterr().out, "length_control.enabled")
    assert row.split()[:2] == ["*", "length_control.enabled"]  # the method's value, not slkit's default
    assert main(["check", str(minimal_recipe), "--explain"]) == 0
    row, _ = _row(capsys.readouterr().out, "length_control.enabled")
    assert row.split()[:2] == ["!", "length_control.enabled"]


def test_check_takes_set_overrides(minimal_recipe, capsys):
    assert main(["check", str(minimal_recipe), "--set", "training.learning_rate=2e-4", "--set", "macro_iterations=1",
                 "--set", "engine.vllm.max_loras=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["learning_rate"] == 2e-4  # a float, read as the recipe's YAML reads it
    assert printed["macro_iterations"] == 1 and printed["engine"]["vllm"]["max_loras"] == 4
    assert printed["training"]["lora_r"] == 8  # the file's other values stay


@pytest.mark.parametrize("pair,error", [
    ("training.lora_rank=8", "--set training.lora_rank: unknown key (got 8)"),
    ("sampling.top_k=twenty", "--set sampling.top_k: Input should be a valid integer (got 'twenty')"),
    ("model.path.x=1", "--set model.path.x: unknown key (model.path is a value, not a section)"),
    ("macro_iterations", "--set expects KEY=VALUE, got 'macro_iterations'"),
], ids=["unknown key", "wrong type", "key under a value", "no value"])
def test_a_bad_set_is_one_error_naming_the_key(minimal_recipe, capsys, pair, error):
    assert main(["check", str(minimal_recipe), "--set", pair]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line.strip() for line in captured.err.strip().splitlines() if line.strip() != "error: invalid parameters:"]
    assert lines == [error] or lines == [f"error: {error}"], captured.err
    assert "minimal.yaml:" not in captured.err  # not the line of the file's training section


def test_docs_params_md_is_the_schema():
    assert (REPO / "docs" / "params.md").read_text(encoding="utf-8") == markdown(), (
        "docs/params.md is out of step: python -m slkit.running.explain > docs/params.md")
