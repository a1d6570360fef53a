"""The guard of a run's `vllm serve` (slkit.engines.server), run by path in a session of its own:

    python slkit/engines/server_guard.py PARENT_PID -- python -m vllm.entrypoints.cli.main serve MODEL ...

It runs the server in its own process group (the guard leads it) and takes the whole group down, the server's
engine-core and worker processes included, when
- the process that started it (`slkit run`, PARENT_PID) dies, however it dies: Linux sends the guard SIGTERM
  then (PR_SET_PDEATHSIG), kill -9 of `slkit run` included;
- it is told to stop (SIGTERM or SIGINT from slkit.engines.server): SIGTERM to the group, so vLLM shuts down in
  order, then SIGKILL to what is left after GRACE_S;
- the server exits on its own (a crash): what it started goes with it.
So no process of the server keeps the GPU once its run is gone. It imports nothing of slkit: a process that lives
as long as the run holds no torch.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 20.0  # vLLM's own shutdown (engine cores, workers) takes a few seconds
PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int) -> None:
    """Have Linux send this process `sig` when the process that started it dies in any way (kill -9 included);
    elsewhere nothing. Also the trainers' (slkit.training.distributed), run in the child before its command."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the group, wait for the server, SIGKILL to every process left in the group (this guard too)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    print(f"slkit server guard: stopped the server (exit status {child.poll()})", flush=True)
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> None:
    parent, separator, command = int(argv[0]), argv[1], argv[2:]
    assert separator == "--" and command, "usage: server_guard.py PARENT_PID -- COMMAND ..."
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above: nothing would tell this guard
        sys.exit("slkit server guard: the process that started the server is gone")
    child = subprocess.Popen(command)  # in this guard's process group
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_group(child))
    # A poll loop, not child.wait(): a signal handler that polls the child must not wait on wait()'s lock.
    while child.poll() is None:
        time.sleep(0.5)
    print(f"slkit server guard: the server exited by itself with status {child.returncode}", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main(sys.argv[1:])
