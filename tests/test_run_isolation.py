"""One run directory, one run: the run lock (slkit/core/runlock.py) and kernels no other local user can reach.

A second holder is refused and changes nothing, the lock of a killed run is taken over, a stage run
by hand on a held directory is refused (and the holder's own kernels pass), and papermill's kernels
talk over Unix sockets in a private directory instead of TCP ports.
"""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, slkit_message

from slkit.core.layout import iter_dir
from slkit.core.params import dump_params
from slkit.core.registry import ITERATION_STAGES
from slkit.core.runlock import TOKEN_ENV, RunLock, RunLockedError
from slkit.stages.drafts import drafts_stage

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`

HOLD = "import sys, time\nfrom slkit.core.runlock import hold_run_dir\nwith hold_run_dir(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(600)\n"


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a run directory's lock, as a running `slkit run` does."""
    procs = []

    def start(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _holder_pattern(pid):
    return rf"in use by slkit run \(pid {pid} on host {socket.gethostname()}, started \d{{4}}-\d\d-\d\d \d\d:\d\d"


def test_a_second_holder_is_refused_naming_the_first(tmp_path, holder):
    run_dir = tmp_path / "run"
    first = holder(run_dir)
    with pytest.raises(RunLockedError, match=_holder_pattern(first.pid)):
        RunLock(run_dir).acquire()
    assert first.poll() is None


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, holder, capsys):
    run_dir = tmp_path / "run"
    dead = holder(run_dir)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    with RunLock(run_dir):  # held now: a third holder is refused
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} "):
            RunLock(run_dir).acquire()
    err = capsys.readouterr().err
    assert f"taking over the run lock of {run_dir}: slkit run (pid {dead.pid} on host" in err
    assert "is no longer running" in err
    with RunLock(run_dir):  # released cleanly: the next holder takes it without a warning
        pass
    assert capsys.readouterr().err == ""


def test_without_flock_the_record_decides(tmp_path, holder, monkeypatch, capsys):
    """Windows and some network filesystems have no flock: a live holder on this host still refuses the
    run, a dead one's record is taken over."""
    from slkit.core import runlock

    run_dir = tmp_path / "run"
    first = holder(run_dir)
    monkeypatch.setattr(runlock, "fcntl", None)
    with pytest.raises(RunLockedError, match=_holder_pattern(first.pid) + r".*If it is not running, delete"):
        RunLock(run_dir).acquire()
    first.kill()
    first.wait()
    with RunLock(run_dir):
        pass
    assert f"taking over the run lock of {run_dir}: slkit run (pid {first.pid}" in capsys.readouterr().err


def _drafts_run(run_dir, smoke_params):
    iter_dir(run_dir, 1).mkdir(parents=True)
    dump_params(smoke_params, run_dir / "params.yaml")
    (iter_dir(run_dir, 1) / "queries.jsonl").write_text(
        json.dumps({"id": "q0", "query": "Write about tea.", "language": "en", "words": 3, "tries": 1}) + "\n")


def test_a_stage_run_by_hand_on_a_held_run_dir_is_refused(tmp_path, holder, smoke_params, scripted_engine,
                                                          monkeypatch):
    run_dir = tmp_path / "run"
    _drafts_run(run_dir, smoke_params)
    first = holder(run_dir)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters: scripted_engine(lambda r: "A short answer."))
    with pytest.raises(RunLockedError, match=_holder_pattern(first.pid)):
        drafts_stage(run_dir, 1)
    assert sorted(p.name for p in iter_dir(run_dir, 1).iterdir()) == ["queries.jsonl"]  # nothing written
    # a kernel started by the holding run inherits its token and passes
    monkeypatch.setenv(TOKEN_ENV, json.loads((run_dir / "run.lock").read_text())["token"])
    assert drafts_stage(run_dir, 1)["drafts"] == 2
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == first.pid  # still the holder's


def test_a_stage_run_by_hand_holds_the_run_dir_while_it_runs(tmp_path, smoke_params, scripted_engine, monkeypatch):
    run_dir = tmp_path / "run"
    _drafts_run(run_dir, smoke_params)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    refusals = []

    def answer(request):  # meanwhile a `slkit run` on the same directory starts
        try:
            RunLock(run_dir).acquire().release()
        except RunLockedError as err:
            refusals.append(str(err))
        return "A short answer."

    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters: scripted_engine(answer))
    drafts_stage(run_dir, 1)
    assert refusals and "the drafts stage run from a notebook" in refusals[0]
    RunLock(run_dir).acquire().release()  # free again once the stage ended


def test_kernels_talk_over_unix_sockets_in_a_private_directory(tmp_path, capfd):
    import nbformat

    from slkit.running.pipeline import ensure_kernel, run_notebook

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("run_dir = ''", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "import ipykernel, json, os, stat\n"
                    "info = json.load(open(ipykernel.get_connection_file()))\n"
                    "print(json.dumps({'transport': info['transport'], 'ip': info['ip'],\n"
                    "                  'mode': stat.S_IMODE(os.stat(os.path.dirname(info['ip'])).st_mode)}))")]
    nb.metadata["kernelspec"] = {"name": "slkit", "language": "python", "display_name": "Python (slkit)"}
    nbformat.write(nb, tmp_path / "probe.ipynb")
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    run_notebook(tmp_path / "probe.ipynb", tmp_path / "probe.out.ipynb", {"run_dir": str(tmp_path)}, ensure_kernel(),
                 sockets)
    [output] = nbformat.read(tmp_path / "probe.out.ipynb", 4).cells[-1].outputs
    info = json.loads(output["text"])
    assert info == {"transport": "ipc", "ip": str(sockets / "kernel"), "mode": 0o700}
    assert "without encryption" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_second_slkit_run_is_refused_and_the_first_goes_on(tmp_path, tiny_model_path):
    """The bug report: a second `slkit run` on the same recipe killed the first run's kernel and both
    wrote the same files. Now it is refused at once (exit 2, the holder named) and touches nothing."""
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "slkit", "run", str(REPO / "params" / "smoke.yaml"), "--no-progress",
               "--set", f"output_dir={out}", "--set", "macro_iterations=1", "--set", "length_control.enabled=false"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    run_dir, stage_lock = out / "smoke", out / "smoke" / "iter_1" / "queries.lock"
    deadline = time.time() + 300
    while not stage_lock.exists():  # the first run's kernel is running the queries stage
        assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.05)
    kernel = int(stage_lock.read_text().split()[0])  # "PID BOOT_ID"
    connection = json.loads(Path(_connection_file(kernel)).read_text())
    assert connection["transport"] == "ipc"
    assert stat.S_IMODE(os.stat(os.path.dirname(connection["ip"])).st_mode) == 0o700
    params_before = ((run_dir / "params.yaml").read_bytes(), (run_dir / "params.yaml").stat().st_mtime_ns)

    # a resource key may change on resume, so without the lock this run would rewrite params.yaml
    second = subprocess.run(command + ["--set", "engine.batch_size=2"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert slkit_message(second.stderr).startswith(f"error: {run_dir} is in use by slkit run (pid {first.pid} on host ")
    assert ((run_dir / "params.yaml").read_bytes(), (run_dir / "params.yaml").stat().st_mtime_ns) == params_before
    assert not (run_dir / "params_changes.log").exists()

    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    for stage in ITERATION_STAGES:
        assert (run_dir / "iter_1" / f"{stage}.done.json").exists()
    assert "without encryption" not in (tmp_path / "first.log").read_text()


def _connection_file(pid):
    """The connection file a running kernel was started with (its -f argument)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("-f") + 1]


def test_a_stage_lock_from_another_machine_stops_no_process_here(tmp_path):
    """A run directory carried to another machine (tools/device) holds <stage>.lock files naming PIDs of
    the machine it came from; here the same number can be any process, the resumed `slkit run` itself
    included. Only a lock written on this boot may stop the process it names."""
    from slkit.core.runlock import boot_id
    from slkit.running.pipeline import stop_orphaned_stage

    kernel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "slkit-kernel-stand-in"])
    try:
        lock = tmp_path / "extensions.lock"
        lock.write_text(f"{kernel.pid} 00000000-another-machine")
        stop_orphaned_stage(lock)
        assert kernel.poll() is None  # left alone
        lock.write_text(f"{os.getpid()} {boot_id()}")
        stop_orphaned_stage(lock)  # never this process
        lock.write_text(f"{kernel.pid} {boot_id()}")
        stop_orphaned_stage(lock)
        assert kernel.wait(timeout=10) == -9  # an orphaned kernel of this machine is stopped
    finally:
        kernel.kill()
