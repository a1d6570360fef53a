import errno
import json
import os

import pytest

from slkit.core.layout import iter_dir
from slkit.core.records import RecordFileError, RecordWriteError, RecordWriter, read_jsonl
from slkit.stages.drafts import drafts_stage


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"query": "a"}\n{"query": \n')
    with pytest.raises(RecordFileError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"query": "a"}\n\n{"other": 1}\n')
    with pytest.raises(RecordFileError, match=r"x.jsonl:3: missing field\(s\) query"):
        read_jsonl(path, required=["query"])


def test_writer_resumes_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "records.jsonl"
    w = RecordWriter(out)
    w.write({"id": 1})
    w.write({"id": 2})
    w._file.close()
    with open(out.with_name("records.jsonl.partial"), "a") as f:
        f.write('{"id": 3, "te')  # killed mid-write
    resumed = RecordWriter(out)
    assert [r["id"] for r in resumed.records] == [1, 2]
    assert not out.exists()  # not complete until finish()
    resumed.write({"id": 3})
    assert [r["id"] for r in resumed.finish()] == [1, 2, 3]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2, 3]
    assert not out.with_name("records.jsonl.partial").exists()


class _DiskWithRoom:
    """Stands in for an open file on a disk with `room` bytes left: a write fills what fits, then the
    next one fails with ENOSPC, as write(2) does on a full disk."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self.file.write(data[:self.room])
        self.room -= n
        return n

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_is_one_error_naming_the_file_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "records.jsonl"
    writer = RecordWriter(out)
    writer.write({"id": 1})
    writer._file = _DiskWithRoom(writer._file, room=25)  # simulated ENOSPC: room for one record and a half
    writer.write({"id": 2, "draft": "x"})
    with pytest.raises(RecordWriteError, match=r"records.jsonl.partial: cannot write \(No space left on device\); "
                                               r"the 2 records before this one are kept: free space and rerun") as err:
        writer.write({"id": 3, "draft": "y"})
    assert err.value.__cause__.errno == errno.ENOSPC
    # no torn line left behind: the file holds the two whole records
    assert [json.loads(line)["id"] for line in out.with_name("records.jsonl.partial").read_text().splitlines()] == [1, 2]
    resumed = RecordWriter(out)
    assert [r["id"] for r in resumed.records] == [1, 2]
    resumed.write({"id": 3, "draft": "y"})
    assert [r["id"] for r in resumed.finish()] == [1, 2, 3]


def test_a_full_disk_while_a_whole_file_is_written_names_it_and_keeps_the_old_one(tmp_path, monkeypatch):
    from slkit.core import records

    out = tmp_path / "resampled.jsonl"
    records.write_jsonl_atomic(out, [{"id": 1}])

    def full_disk(path, *args, **kwargs):
        return _DiskWithRoom(open(path, "w", encoding="utf-8"), room=10)  # simulated ENOSPC after 10 bytes

    monkeypatch.setattr(records, "open", full_disk, raising=False)
    with pytest.raises(RecordWriteError, match=r"resampled.jsonl: cannot write \(No space left on device\)"):
        records.write_jsonl_atomic(out, [{"id": 1}, {"id": 2}])
    assert out.read_text() == '{"id": 1}\n' and not out.with_name("resampled.jsonl.tmp").exists()


def test_a_finished_file_of_an_unfinished_stage_is_resumed_not_redone(tmp_path):
    """A stage killed after it finished one file (say benchmark_outputs.jsonl) but before its done-marker."""
    out = tmp_path / "outputs.jsonl"
    first = RecordWriter(out)
    first.write({"index": 0})
    first.finish()
    again = RecordWriter(out)
    assert again.records == [{"index": 0}]
    assert [r["index"] for r in again.finish()] == [0]
    assert out.read_text() == '{"index": 0}\n'


_FILL_A_TMPFS = '''
import json, subprocess, sys
from pathlib import Path
from slkit.core.layout import iter_dir
from slkit.stages import common
from slkit.stages.drafts import drafts_stage

run_dir, queries = Path(sys.argv[1]), sys.argv[2]
out = iter_dir(run_dir, 1)
out.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], check=True)
(out / "queries.jsonl").write_text(queries)

class Engine:
    is_chat = False
    def render(self, message): return message
    def generate(self, requests, sampling, on_done=None): return [draft(r.seed) for r in requests]
    def close(self): pass

def draft(seed): return " ".join(f"w{seed}x{i}" for i in range(300)) + "."

common.load_engine = lambda params, adapters: Engine()
try:
    drafts_stage(run_dir, 1)
    error = None
except OSError as err:
    error = str(err)
kept = (out / "drafts.jsonl.partial").read_text()
subprocess.run(["mount", "-o", "remount,size=1m", str(out)], check=True)  # space freed
drafts_stage(run_dir, 1)
print(json.dumps({"error": error, "kept": kept, "drafts": (out / "drafts.jsonl").read_text()}))
'''


def _can_mount_a_tmpfs():
    import shutil
    import subprocess

    return shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_a_tmpfs(), reason="needs unprivileged user namespaces (unshare -rm) for a tmpfs")
def test_a_stage_on_a_really_full_disk_stops_naming_the_file_and_resumes(tmp_path, smoke_params, scripted_engine,
                                                                        monkeypatch):
    """The drafts stage writes into a 64 KiB tmpfs until the disk is full, then the tmpfs grows and
    the stage reruns: the records kept before the error stay, the rest are added, none twice."""
    import subprocess
    import sys

    from slkit.core.params import dump_params

    queries = "".join(json.dumps({"id": f"q{i}", "query": f"Write about {i}.", "language": "en", "words": 3,
                                  "tries": 1}) + "\n"
                      for i in range(12))
    dirs = {name: tmp_path / name / "run" for name in ("full", "clean")}
    for run_dir in dirs.values():
        run_dir.mkdir(parents=True)
        dump_params(smoke_params, run_dir / "params.yaml")
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", _FILL_A_TMPFS, str(dirs["full"]), queries],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["error"].startswith(f"{iter_dir(dirs['full'], 1)}/drafts.jsonl.partial: cannot write "
                                      "(No space left on device)")
    kept = [json.loads(line) for line in result["kept"].splitlines()]
    assert 0 < len(kept) < 24 and result["kept"].endswith("\n")

    # the same stage, uninterrupted, on a disk with room
    (iter_dir(dirs["clean"], 1)).mkdir()
    (iter_dir(dirs["clean"], 1) / "queries.jsonl").write_text(queries)
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters: scripted_engine(
        lambda r: " ".join(f"w{r.seed}x{i}" for i in range(300)) + "."))
    drafts_stage(dirs["clean"], 1)
    expected = sorted(read_jsonl(iter_dir(dirs["clean"], 1) / "drafts.jsonl"), key=lambda r: r["id"])
    got = [json.loads(line) for line in result["drafts"].splitlines()]
    assert got[:len(kept)] == kept  # kept as they were
    assert sorted(got, key=lambda r: r["id"]) == expected  # nothing lost, nothing twice
