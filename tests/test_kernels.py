"""Kernels started ahead of their notebooks (slkit.running.kernels): the next stage's kernel imports while the
current stage runs, the notebook then runs in it, and no kernel outlives its notebook or the run."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import nbformat
import pytest
from conftest import hand_logs_to_caplog

from slkit.engines.server import _alive as alive
from slkit.running.kernels import KernelsAhead, import_statements
from slkit.running.pipeline import ensure_kernel, kernel_connection, run_notebook


def notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("run_dir = ''", metadata={"tags": ["parameters"]}),
                *(nbformat.v4.new_code_cell(c) for c in cells), nbformat.v4.new_markdown_cell("import not_code")]
    nb.metadata["kernelspec"] = {"name": "slkit", "language": "python", "display_name": "Python (slkit)"}
    nbformat.write(nb, path)
    return path


def test_import_statements_are_the_notebooks_imports_only(tmp_path):
    nb = notebook(tmp_path / "a.ipynb", "import os, json\nfrom pathlib import Path as P\nx = 1\n",
                  "%matplotlib inline\nimport skipped_with_its_cell",
                  "def f():\n    import inside_a_function\nfrom collections import (\n    Counter)")
    assert import_statements(nb).splitlines() == ["import os, json", "from pathlib import Path as P",
                                                  "from collections import Counter"]


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A module that notes the pid and time of each import of it, importable from the kernels' working folder."""
    (tmp_path / "probe_mod.py").write_text(
        "import os, time\n"
        "with open('imports.log', 'a') as f:\n"
        "    f.write(f'{os.getpid()} {time.time()}\\n')\n")
    monkeypatch.chdir(tmp_path)
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    return sockets


def imports(tmp_path: Path) -> list[tuple[int, float]]:
    log = tmp_path / "imports.log"
    return [(int(p), float(t)) for p, t in (line.split() for line in log.read_text().splitlines())] if log.exists() else []


def wait_for_imports(tmp_path: Path, count: int) -> list[tuple[int, float]]:
    deadline = time.time() + 60
    while len(imports(tmp_path)) < count and time.time() < deadline:
        time.sleep(0.2)
    return imports(tmp_path)


def run_in_time(*args, limit_s: float = 90) -> None:
    """run_notebook, failed after `limit_s` instead of hanging (two kernels sharing sockets hang papermill)."""
    done: list[BaseException | None] = []

    def target():
        try:
            run_notebook(*args)
            done.append(None)
        except BaseException as err:  # handed to the test below
            done.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert done, f"the notebook did not finish within {limit_s} s"
    if done[0] is not None:
        raise done[0]


def test_each_notebook_runs_in_the_kernel_that_imported_its_modules_ahead_and_the_kernel_goes_after(tmp_path, probe):
    """As `slkit run` does it: the second stage's kernel starts (and imports) while the first stage runs."""
    first = notebook(tmp_path / "first.ipynb", "import probe_mod", "import os\nprint(os.getpid())")
    second = notebook(tmp_path / "second.ipynb", "import probe_mod", "import os\nprint(os.getpid())")
    kernel = ensure_kernel()
    pids = []
    with KernelsAhead(kernel, kernel_connection(probe), tmp_path) as kernels:
        kernels.start(first)
        wait_for_imports(tmp_path, 1)
        for nb, later in ((first, second), (second, None)):
            km = kernels.take(nb)
            assert km is not None
            if later:
                kernels.start(later)
                wait_for_imports(tmp_path, 2)  # both kernels up at once
            started = time.time()
            run_in_time(nb, nb.with_suffix(".out.ipynb"), {"run_dir": str(tmp_path)}, kernel, probe, km)
            kernels.stop(km)
            [printed] = [c for c in nbformat.read(nb.with_suffix(".out.ipynb"), 4).cells if "getpid" in c.source]
            pids.append(int(printed.outputs[0]["text"]))
            assert [t for p, t in imports(tmp_path) if p == pids[-1]][0] < started  # imported before it ran,
    assert [p for p, _ in imports(tmp_path)] == pids  # in the kernel it ran in, once
    assert len(set(pids)) == 2 and not any(alive(p) for p in pids)


def test_a_kernel_never_taken_is_stopped_with_the_run(tmp_path, probe):
    nb = notebook(tmp_path / "next.ipynb", "import probe_mod")
    with KernelsAhead(ensure_kernel(), kernel_connection(probe), tmp_path) as kernels:
        kernels.start(nb)
        wait_for_imports(tmp_path, 1)
        raise_here = pytest.raises(RuntimeError, match="the current stage failed")
        with raise_here:
            with kernels:
                raise RuntimeError("the current stage failed")
    [(pid, _)] = imports(tmp_path)
    assert not alive(pid)
    assert kernels.take(nb) is None


def test_a_kernel_that_cannot_start_ahead_leaves_the_notebook_to_papermill(tmp_path, probe, caplog, monkeypatch):
    nb = notebook(tmp_path / "stage.ipynb", "import probe_mod")
    kernels = KernelsAhead("no-such-kernel-spec", kernel_connection(probe), tmp_path)
    hand_logs_to_caplog(caplog, monkeypatch, "slkit.running.kernels")
    kernels.start(nb)
    assert kernels.take(nb) is None
    assert "could not start the kernel of stage.ipynb ahead of it" in caplog.text


def test_kernels_up_at_once_never_share_a_socket(tmp_path, probe):
    """ipc "ports" are numbered from 1 under one path prefix: two kernels on one prefix bind the same socket files,
    and the first one's cleanup deletes the second's (a run hung on its second stage that way)."""
    kernels = KernelsAhead(ensure_kernel(), kernel_connection(probe), tmp_path)
    try:
        for name in ("a", "b"):
            kernels.start(notebook(tmp_path / f"{name}.ipynb", "import os"))
        paths = [{f"{info['ip']}-{info[key]}" for key in info if key.endswith("_port")}
                 for info in (km.get_connection_info() for km, _ in kernels.ahead.values())]
        assert len(paths) == 2 and all(len(p) == 5 for p in paths) and not paths[0] & paths[1]
    finally:
        kernels.close()
