"""One run directory, one run: whoever writes runs/<run>/ holds its run lock.

    with hold_run_dir(run_dir):   # what `slkit run` does; a second holder is refused at once
        ...

The lock is an flock(2) on runs/<run>/run.lock, so the operating system drops it when its holder
dies (kill -9, a crash, a reboot) and no stale lock can block a rerun. The file also records who
holds it (pid, host, start time, a token) for the refusal message; a record left behind by a holder
that died is taken over with a warning. Kernels started by the holding `slkit run` inherit its token
(SLKIT_RUN_LOCK) and pass; a stage run by hand from a notebook takes the lock for as long as the
stage runs (`lock_for_stage`), and is refused while another run holds it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock, the record alone decides (as on a filesystem without flock)
    fcntl = None

LOCK_FILE = "run.lock"
TOKEN_ENV = "SLKIT_RUN_LOCK"  # the holder's token, inherited by the notebooks' kernels it starts


class RunLockedError(RuntimeError):
    """The run directory is held by another live run; the message names it."""


class RunLock:
    """The run lock of one run directory, held by this process once `acquire` returns."""

    def __init__(self, run_dir: str | os.PathLike, holder: str = "slkit run"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.holder = holder  # what holds it, for the message a refused run prints
        self.token = uuid.uuid4().hex
        self.took_over: str | None = None  # the dead holder whose lock this one took over, for the run's log
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                locked = _flock(fd)
            except BlockingIOError:
                raise RunLockedError(refusal(self.run_dir, read_record(fd))) from None
            if not locked:  # no flock here: the record alone decides
                record = read_record(fd)
                if record and not _gone(record):
                    raise RunLockedError(refusal(self.run_dir, record) + f" If it is not running, delete "
                                         f"{self.path}.") from None
            previous = read_record(fd)
            if previous:  # its holder died without releasing it: kill -9, a crash or a reboot
                self.took_over = describe(previous)
                print(f"warning: taking over the run lock of {self.run_dir}: {describe(previous)} "
                      "is no longer running", file=sys.stderr)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "holder": self.holder, "token": self.token}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the record (a clean end, no warning for the next holder) and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flock(fd: int) -> bool:
    """Take the flock without waiting: True when taken, False where the platform or filesystem has none
    (Windows, some network mounts); BlockingIOError while another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise  # BlockingIOError (EWOULDBLOCK) among them
        return False
    return True


def read_record(fd: int) -> dict[str, Any]:
    """The holder's record in the lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}


def describe(record: dict[str, Any]) -> str:
    return (f"{record.get('holder', 'a run')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")


def refusal(run_dir: Path, record: dict[str, Any]) -> str:
    return (f"{run_dir} is in use by {describe(record)}; two runs in one directory would mix their files. "
            f"Wait for it to finish or stop it, or use another run_name.")


def boot_id() -> str:
    """This boot of this machine: a PID names a process only within it. Linux's boot id, else the host name.
    A run directory carried to another machine (tools/device) or kept over a reboot has other boot ids."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def _gone(record: dict[str, Any]) -> bool:
    """The recorded holder ran on this host and its process no longer exists."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int) or os.name != "posix":
        return False  # another machine's process cannot be checked from here (nor safely on Windows)
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


@contextmanager
def hold_run_dir(run_dir: str | os.PathLike) -> Iterator[RunLock]:
    """Hold the run lock while the body runs; the kernels this process starts inherit the token and pass."""
    lock = RunLock(run_dir).acquire()
    inherited = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = lock.token
    try:
        yield lock
    finally:
        if inherited is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = inherited
        lock.release()


def lock_for_stage(run_dir: str | os.PathLike, stage: str) -> RunLock | None:
    """A stage about to write run_dir: None when the `slkit run` that started this kernel holds it;
    else the lock, taken for this stage (release it when the stage ends). Refused while another run holds it."""
    lock = RunLock(run_dir, holder=f"the {stage} stage run from a notebook")
    try:
        return lock.acquire()
    except RunLockedError:
        token = os.environ.get(TOKEN_ENV)
        with open(lock.path, "rb") as f:
            if token and read_record(f.fileno()).get("token") == token:
                return None
        raise
