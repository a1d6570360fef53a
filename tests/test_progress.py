"""Progress a person can read: a stage's progress moves as the engine finishes texts, not only when records are
done (every extension job of a stage finishes in its last micro-iteration), and the pipeline's bar shows it."""
import io
import json

from tqdm import tqdm

from conftest import REPO, ScriptedEngine
from slkit.core.layout import iter_dir
from slkit.running.pipeline import ProgressPoller, prepare_run
from slkit.core.records import Progress, write_jsonl_atomic
from slkit.stages.extensions import extensions_stage


def _extension(request):
    return "\n\n".join(" ".join(f"s{request.seed}p{p}w{i}" for i in range(60)) + "." for p in range(3))


def test_a_multi_micro_iteration_extension_advances_the_progress_before_the_stage_ends(tmp_path, monkeypatch):
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path), "drafts.resample": False,
                                                                  "extensions.samples_per_draft": 1})
    out = iter_dir(run_dir, 1)
    out.mkdir()
    draft = " ".join(f"d{i}" for i in range(40)) + "."
    write_jsonl_atomic(out / "drafts.jsonl", [{"id": f"it1-q{i}-d0", "query_id": f"it1-q{i}", "query": f"Write {i}.",
                                               "language": "en", "sample": 0, "draft": draft, "words": 41, "tries": 1}
                                              for i in range(5)])
    seen = []

    class Watching(ScriptedEngine):
        def generate(self, requests, sampling, on_done=None):
            seen.append(json.loads((out / "progress.json").read_text()))  # what the bar shows as this call starts
            return super().generate(requests, sampling, on_done)

    monkeypatch.setattr(Progress, "interval_s", 0.0)  # write every change: the test reads each one
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda *args: Watching(_extension))
    summary = extensions_stage(run_dir, 1)
    # 5 jobs x 2 micro-iterations x 2 phases: 4 calls; every job finishes in the last one
    assert summary["extensions"] == 5 and len(seen) == 4
    assert [(s["done"], s["texts"]) for s in seen] == [(0, 0), (0, 5), (0, 10), (0, 15)]
    assert all(s["total"] == 5 and s["texts_expected"] == 20 for s in seen)
    final = json.loads((out / "progress.json").read_text())
    assert (final["done"], final["texts"]) == (5, 20)


def _bar():
    return tqdm(total=0, file=io.StringIO())


def test_the_bar_follows_the_texts_with_the_records_beside_them(tmp_path):
    bar = _bar()
    poller = ProgressPoller(tmp_path, bar)
    state = {"stage": "extensions", "done": 0, "total": 5, "texts": 0, "texts_expected": 20, "started": 1.0}
    (tmp_path / "progress.json").write_text(json.dumps(state))
    poller._update()
    assert (bar.n, bar.total, bar.postfix) == (0, 5, "0/5 records")  # no text yet: records
    (tmp_path / "progress.json").write_text(json.dumps({**state, "texts": 10}))
    poller._update()
    assert (bar.n, bar.total, bar.unit, bar.desc.strip(": ")) == (10, 20, "text", "extensions")
    (tmp_path / "progress.json").write_text(json.dumps({**state, "texts": 24, "texts_expected": 24, "done": 5}))
    poller._update()  # retries took more texts than expected: the total grows with them
    assert (bar.n, bar.total, bar.postfix) == (24, 24, "5/5 records")
    assert "text/s" in str(bar)  # a rate, hence an ETA, of texts


def test_a_resumed_stage_starts_its_bar_at_the_records_done(tmp_path):
    bar = _bar()
    (tmp_path / "progress.json").write_text(json.dumps({"stage": "training", "done": 1, "total": 2, "texts": 0,
                                                        "texts_expected": 1, "started": 2.0}))
    ProgressPoller(tmp_path, bar)._update()
    assert (bar.n, bar.initial, bar.total) == (1, 1, 2)


def test_progress_is_written_safely_from_engine_threads(tmp_path, monkeypatch):
    """Texts finish on an engine's worker threads while records end on the stage's: every write is whole."""
    import threading

    from slkit.core.records import Progress

    import time

    from slkit.core import records

    monkeypatch.setattr(Progress, "interval_s", 0.0)  # write at every call
    writing, most = [0], [0]
    atomic = records.write_json_atomic

    def slow_atomic_write(path, value):  # a slow disk: writes that overlap would share progress.json.tmp
        writing[0] += 1
        most[0] = max(most[0], writing[0])
        time.sleep(0.0005)
        atomic(path, value)
        writing[0] -= 1

    monkeypatch.setattr(records, "write_json_atomic", slow_atomic_write)
    progress = Progress(tmp_path, "drafts", total=400)
    threads = [threading.Thread(target=lambda: [progress.generated(1) for _ in range(200)]) for _ in range(6)]
    for t in threads:
        t.start()
    for _ in range(400):
        progress.advance(1)
    for t in threads:
        t.join()
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 400
    assert not list(tmp_path.glob("*.tmp")) and most[0] == 1
