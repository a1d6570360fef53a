"""The stages' kernels, each started while the stage before it runs.

A stage's notebook needs a fresh kernel, and a fresh kernel spends seconds starting and importing what the
notebook imports (torch, transformers, the stage's modules): 3 to 23 s per stage on the H200 machine's CPU, about
4 minutes of the growth run's 17 stages (docs/benchmarks.md). `slkit run` knows which notebook comes next, so it
starts that notebook's kernel as soon as the current stage has begun, and has it run the notebook's import
statements, nothing else (no parameters, no setup: the kernel's only state is imported modules). The notebook then
starts at once. A kernel whose notebook is done is killed (its work is written; a graceful shutdown waits up to
seconds), so the next stage neither waits for it nor shares the GPU with what it held.

The kernels talk to this process only (the run's private socket folder: slkit.running.pipeline.kernel_connection)
and exit with it (ipykernel polls its parent). A kernel that fails to start here costs nothing: papermill starts
the notebook's kernel itself, as it would without this module.
"""
from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client import AsyncKernelManager, BlockingKernelClient
from jupyter_core.utils import run_sync

log = logging.getLogger(__name__)


def import_statements(notebook: str | Path) -> str:
    """The top-level import statements of a notebook's code cells, in order; a cell that is not plain Python (a
    magic, a shell line) is skipped."""
    lines = []
    for cell in nbformat.read(str(notebook), as_version=4).cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue
        lines += [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return "\n".join(lines)


class KernelsAhead:
    """Kernels started ahead of their notebooks: `start(nb)` while another stage runs, `take(nb)` for papermill
    (None: papermill starts one itself), `stop(km)` once the notebook is done, `close()` at the end (a kernel
    never taken is stopped there)."""

    def __init__(self, kernel_name: str, connection: dict[str, str], cwd: str | Path):
        self.kernel_name, self.connection, self.cwd = kernel_name, dict(connection), str(cwd)
        self.ahead: dict[Path, tuple[AsyncKernelManager, BlockingKernelClient]] = {}
        self.started: list[Path] = []

    def start(self, notebook: str | Path) -> None:
        notebook = Path(notebook).resolve()
        if notebook in self.ahead:
            return
        connection = dict(self.connection)
        if connection.get("transport") == "ipc":  # ipc "ports" are numbered 1-5 under the ip prefix: one prefix each
            connection["ip"] = f"{connection['ip']}-ahead{len(self.started)}"
        self.started.append(notebook)
        try:
            km = AsyncKernelManager(kernel_name=self.kernel_name, **connection)
            run_sync(km.start_kernel)(cwd=self.cwd)
        except Exception as err:  # papermill will start the kernel itself, and report what is wrong
            log.warning("could not start the kernel of %s ahead of it (%s: %s); it starts with its notebook",
                        notebook.name, type(err).__name__, err)
            return
        client = BlockingKernelClient()
        client.load_connection_info(km.get_connection_info())
        client.start_channels()
        # Not waited for: the kernel imports while the current stage runs. Its reply and output go to this client
        # only; an import that fails fails again, with its traceback, in the notebook.
        client.execute(import_statements(notebook), silent=True, store_history=False)
        self.ahead[notebook] = (km, client)

    def take(self, notebook: str | Path) -> AsyncKernelManager | None:
        entry = self.ahead.pop(Path(notebook).resolve(), None)
        if entry is None:
            return None
        km, client = entry
        client.stop_channels()  # the import request was sent long ago; papermill opens its own client
        if not run_sync(km.is_alive)():
            log.warning("the kernel started ahead for %s had exited; it starts with its notebook", Path(notebook).name)
            return None
        return km

    def stop(self, km: AsyncKernelManager | None) -> None:
        """Kill `km`'s kernel, whose notebook is done (papermill leaves a kernel it did not start running)."""
        if km is None:
            return
        try:
            run_sync(km.shutdown_kernel)(now=True)
        except Exception as err:  # a kernel already gone
            log.debug("kernel shutdown: %s: %s", type(err).__name__, err)

    def close(self) -> None:
        for km, client in self.ahead.values():
            client.stop_channels()
            self.stop(km)
        self.ahead.clear()

    def __enter__(self) -> KernelsAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

