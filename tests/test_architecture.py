"""The layout's contracts: slkit's packages are layers whose imports only point down (pyproject.toml's
[tool.importlinter] contract, checked by import-linter, with no exception), imports between slkit's modules form
no cycle, every stage of the registry has its notebook, module, function and (where it has one) params section
under one name, the loop runs the registry's stages in order, and the README's loop table is the registry's."""
import ast
import importlib
import json
import os
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO
from importlinter.cli import lint_imports

from slkit.core.params import Params
from slkit.core.registry import ITERATION_STAGES, STAGES, loop_table
from slkit.running.loop import self_lengthen

PACKAGE = REPO / "slkit"


def module_name(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def slkit_imports(path, modules):
    """The slkit modules `path` imports, at any depth of the file (function-local imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "slkit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slkit":
            for alias in node.names:  # `from slkit.x import y` imports the module slkit.x.y when there is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & set(modules)


def import_graph():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: slkit_imports(path, modules) - {name} for name, path in modules.items()}


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    (tmp_path / "slkit").mkdir()
    (tmp_path / "slkit" / "a.py").write_text("from slkit.b import f\n")
    (tmp_path / "slkit" / "b.py").write_text("def f():\n    from slkit.a import g\n")
    modules = {"slkit.a": tmp_path / "slkit" / "a.py", "slkit.b": tmp_path / "slkit" / "b.py"}
    graph = {name: slkit_imports(path, modules) - {name} for name, path in modules.items()}
    assert cycles(graph) == [["slkit.a", "slkit.b"]]


def test_slkit_imports_form_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["slkit.stages.common"] >= {"slkit.engines", "slkit.core.layout"}
    assert cycles(graph) == []


# Imported where they are used, each for its reason: optional extras (vllm: Linux + CUDA; bitsandbytes and
# liger_kernel: the gpu extra; gguf: the demo extra) and fcntl (POSIX only, a module-level try); and the command
# line, which imports the module of the command it runs (its docstring says why).
LOCAL_IMPORTS_ALLOWED = {"vllm", "bitsandbytes", "liger_kernel", "gguf", "fcntl"}
COMMAND_LINE = PACKAGE / "running" / "cli.py"
# load_engine imports only the backend it picks: a notebook kernel on the run's server does not pay for peft,
# bitsandbytes and vLLM at every stage's start (test_a_stage_on_the_server_imports_no_other_backend).
BACKEND_CHOOSER = PACKAGE / "engines" / "__init__.py"


def local_imports(path):
    """(line, top-level package) of every import below a module's top level (in a function, class or try)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return [(node.lineno, (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0])
            for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]


def test_local_imports_are_found(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    import torch\n    from slkit.x import y\n")
    assert local_imports(module) == [(4, "torch"), (5, "slkit")]


def test_imports_are_at_the_top_of_modules_but_the_optional_ones():
    found = [f"{path.relative_to(REPO)}:{line}: {package}" for path in sorted(PACKAGE.rglob("*.py"))
             for line, package in local_imports(path)
             if package not in LOCAL_IMPORTS_ALLOWED and not (path in (COMMAND_LINE, BACKEND_CHOOSER) and package == "slkit")]
    assert found == []


def test_a_stage_on_the_server_imports_no_other_backend():
    """What a stage's notebook imports (lessons, method, stages) leaves the transformers and vLLM backends, peft,
    bitsandbytes, TRL and transformers' modeling code unimported: each was seconds of every kernel's start on the
    GPU machine."""
    code = ("import sys, slkit.lessons, slkit.stages.queries, slkit.stages.drafts, slkit.stages.extensions, "
            "slkit.stages.evaluation, slkit.method.drafts, slkit.engines\n"
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'trl', 'vllm', 'slkit.engines.transformers', "
            "'slkit.engines.vllm', 'transformers.modeling_utils') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_layers_contract_has_no_exception_and_covers_every_package():
    [layers] = CONTRACTS
    assert layers["type"] == "layers" and layers["containers"] == ["slkit"] and layers["exhaustive"] is True
    assert not {"ignore_imports", "exhaustive_ignores"} & set(layers), "the layers contract lists exceptions"
    named = {name.strip() for layer in layers["layers"] for name in layer.split("|")}
    packages = {p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert named == packages - {"__init__"}


def test_slkit_imports_only_point_down_the_layers():
    """import-linter on slkit: a module that imports from a layer above its own breaks the contract (its report,
    naming the import, is in the captured output)."""
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def _fake_slkit(root, upward_import):
    """A package named slkit with one empty package per layer of the contract, and `upward_import` in the ground."""
    (root / "slkit").mkdir()
    (root / "slkit" / "__init__.py").write_text("")
    for layer in CONTRACTS[0]["layers"]:
        for name in (n.strip() for n in layer.split("|")):
            if name == "__main__":
                (root / "slkit" / "__main__.py").write_text("import slkit.running\n")
                continue
            (root / "slkit" / name).mkdir()
            (root / "slkit" / name / "__init__.py").write_text("")
    (root / "slkit" / "core" / "ground.py").write_text(upward_import)
    (root / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("upward", [False, True], ids=["down only", "upward import"])
def test_the_contract_fails_an_upward_import(tmp_path, upward):
    _fake_slkit(tmp_path, "from slkit.running import x\n" if upward else "import json\n")
    lint = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    done = subprocess.run([sys.executable, "-c", lint, "pyproject.toml", "--no-cache", "--no-logo"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == (1 if upward else 0), done.stdout + done.stderr
    assert ("slkit.core.ground -> slkit.running" in done.stdout) == upward, done.stdout


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_a_stage_has_one_name_for_notebook_module_function_and_params(stage):
    assert stage.notebook.split("_", 1)[1] == f"{stage.name}.ipynb" and (REPO / "notebooks" / stage.notebook).exists()
    assert callable(getattr(importlib.import_module(stage.module), stage.function))
    code = "".join("".join(c["source"]) for c in json.loads((REPO / "notebooks" / stage.notebook).read_text())["cells"]
                   if c["cell_type"] == "code")
    assert f"from {stage.module} import {stage.function}" in code
    if stage.name in Params.model_fields:
        assert stage.name in stage.params
    assert set(stage.params) <= set(Params.model_fields)


def test_the_registry_lists_every_notebook_and_stage_module():
    assert sorted(s.notebook for s in STAGES) == sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "common"}
    assert modules == {s.name for s in STAGES}


@pytest.mark.parametrize("baseline, final", [(True, True), (False, False)])
def test_the_loop_runs_the_registrys_stages_in_order(smoke_params, baseline, final):
    params = smoke_params.model_copy(update={
        "macro_iterations": 2, "evaluation": smoke_params.evaluation.model_copy(update={"baseline": baseline}),
        "length_control": smoke_params.length_control.model_copy(update={"enabled": final})})
    assert params.evaluation.benchmark
    assert list(self_lengthen(params)) == ([(0, "evaluation")] * baseline
                                           + [(k, stage) for k in (1, 2) for stage in ITERATION_STAGES]
                                           + [(2, "length_control")] * final)


def test_the_readme_links_the_loop_module():
    loop = REPO / "slkit" / "running" / "loop.py"
    assert len(loop.read_text().splitlines()) <= 80, "the loop module should read at once"
    section = (REPO / "README.md").read_text().split("## The loop", 1)[1].split("\n## ", 1)[0]
    assert "(slkit/running/loop.py)" in section


def test_the_readme_loop_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- stages:begin -->\n", 1)[1].split("\n<!-- stages:end -->", 1)[0]
    assert block == loop_table()
