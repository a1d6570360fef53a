"""The repository's own contracts: notebooks stripped with a literal parameters cell, and
environment.yml in step with pyproject.toml."""
import ast
import json
import re
import tomllib

import pytest
import yaml

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_six_ordered_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["00_queries", "01_drafts", "02_extensions", "03_training", "04_evaluation",
                                          "05_length_control"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_has_a_literal_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    [params] = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    for node in ast.parse("".join(params["source"])).body:
        assert isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    # notebooks orchestrate: no function or class is defined in them
    for c in code:
        tree = ast.parse("".join(c["source"]))
        assert not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.walk(tree))


def test_environment_yml_installs_pyproject_and_names_no_package_of_its_own():
    """pyproject.toml is the one list of packages: environment.yml adds Python and pip only, and installs the
    project with extras pyproject.toml defines, at the lock's versions."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    [pip] = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    conda = sorted(d for d in env["dependencies"] if isinstance(d, str))
    assert conda == ["pip", "python=" + project["requires-python"].removeprefix(">=")]  # the oldest Python allowed
    constraints, editable = pip
    assert constraints == "-c constraints.txt", "environment.yml: pip does not take the lock's versions"
    match = re.fullmatch(r"-e \.\[([a-z,]+)\]", editable)
    assert match, f"environment.yml: pip installs {editable!r}, not the project with its extras"
    assert set(match[1].split(",")) <= set(project["optional-dependencies"])


def test_no_recipe_default_or_user_command_names_the_shared_folder():
    """Users have no ../shared: recipes, param defaults, the Makefile and the README must not need it."""
    from slkit.core.params import EvaluationParams, QueryParams

    files = sorted((REPO / "params").glob("*.yaml")) + [REPO / "Makefile", REPO / "README.md", REPO / "environment.yml"]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "shared/" in line and not (path.name == "README.md" and "test" in line):
                raise AssertionError(f"{path.name}:{number} names the shared folder: {line.strip()}")
    assert "shared" not in str(EvaluationParams().benchmark) and not QueryParams().exemplar_files
