import json

import pytest

from slkit.records import RecordFileError, RecordWriter, read_jsonl


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"query": "a"}\n{"query": \n')
    with pytest.raises(RecordFileError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"query": "a"}\n\n{"other": 1}\n')
    with pytest.raises(RecordFileError, match=r"x.jsonl:3: missing field\(s\) query"):
        read_jsonl(path, required=["query"])


def test_writer_resumes_and_drops_a_torn_line(tmp_path):
    out = tmp_path / "drafts.jsonl"
    w = RecordWriter(out)
    w.write({"id": 1})
    w.write({"id": 2})
    w._file.close()
    with open(out.with_name("drafts.jsonl.partial"), "a") as f:
        f.write('{"id": 3, "te')  # killed mid-write
    resumed = RecordWriter(out)
    assert [r["id"] for r in resumed.records] == [1, 2]
    assert not out.exists()  # not complete until finish()
    resumed.write({"id": 3})
    assert [r["id"] for r in resumed.finish()] == [1, 2, 3]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 2, 3]
    assert not out.with_name("drafts.jsonl.partial").exists()
