"""The layout's contracts: imports between slkit's modules form no cycle, every stage of the registry has its
notebook, module, function and (where it has one) params section under one name, and the README's loop table is
the registry's."""
import ast
import importlib
import json

import pytest

from conftest import REPO
from slkit.running.params import Params
from slkit.running.registry import STAGES, loop_table

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
    assert len(graph) > 30 and graph["slkit.stages.common"] >= {"slkit.engines", "slkit.running.layout"}
    assert cycles(graph) == []


# Imported where they are used, each for its reason: optional extras (vllm: Linux + CUDA; bitsandbytes and
# liger_kernel: the gpu extra; gguf: the demo extra) and fcntl (POSIX only, a module-level try); and the command
# line, which imports the module of the command it runs (its docstring says why).
LOCAL_IMPORTS_ALLOWED = {"vllm", "bitsandbytes", "liger_kernel", "gguf", "fcntl"}
COMMAND_LINE = PACKAGE / "running" / "cli.py"


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
             if package not in LOCAL_IMPORTS_ALLOWED and not (path == COMMAND_LINE and package == "slkit")]
    assert found == []


def test_the_foundation_imports_no_stage_and_no_engine():
    """Params, records and the run layout sit below everything; the method's steps never reach for stages."""
    graph = import_graph()
    for name in ("slkit.running.params", "slkit.running.records", "slkit.running.layout", "slkit.running.registry"):
        assert not any(dep.startswith(("slkit.stages", "slkit.engines", "slkit.method")) for dep in graph[name]), name
    for name in (n for n in graph if n.startswith("slkit.method")):
        assert not any(dep.startswith(("slkit.stages", "slkit.running.pipeline", "slkit.running.cli")) for dep in graph[name]), name


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


def test_the_readme_loop_table_is_the_registry():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- stages:begin -->\n", 1)[1].split("\n<!-- stages:end -->", 1)[0]
    assert block == loop_table()
