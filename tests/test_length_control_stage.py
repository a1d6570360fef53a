"""The final stage on a hand-made run directory with a scripted engine and a stand-in trainer (no model):
which pairs it takes, the collection pass, skipped queries, and reruns when the last iteration changes; on
vLLM (a fake one, tests/fixtures/fake_vllm), each engine phase in a child process of its own."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import FAKE_VLLM, REPO
from test_length_control import longen_accepts

from slkit.core.layout import adapter_dir, iter_dir, stage_done
from slkit.core.params import dump_params, load_params
from slkit.core.records import read_json, read_jsonl
from slkit.engines.base import stable_seed
from slkit.method.textstats import count_words
from slkit.method.training_sets import resample_by_length
from slkit.stages.length_control import COLLECTION, PHASES, ChildPhaseError, length_control_stage

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`

VOCAB = ("river mountain garden lantern harbor meadow orchard valley canyon forest island desert glacier village "
         "market bridge castle temple library museum theater factory railway airport station stadium college "
         "hospital kitchen workshop studio gallery festival harvest journey voyage compass anchor beacon").split()


def _text(seed: int, words: int) -> str:
    return " ".join(random.Random(seed).choices(VOCAB, k=words)) + "."


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _iteration(run_dir, k):
    """iter_<k>/ as the loop leaves it: queries, drafts, extensions, a Generator adapter, metrics."""
    d = iter_dir(run_dir, k)
    queries = [{"id": f"it{k}-q0", "query": f"Describe the history of harbor towns, part {k}.", "language": "en",
                "words": 8, "tries": 1},
               {"id": f"it{k}-q1", "query": "Write 500 words about mountain villages.", "language": "en",
                "words": 6, "tries": 1}]
    _jsonl(d / "queries.jsonl", queries)
    drafts = [{"id": f"{q['id']}-d0", "query_id": q["id"], "query": q["query"], "language": "en", "sample": 0,
               "draft": _text(k * 10 + i, 30), "words": 30, "tries": 1} for i, q in enumerate(queries)]
    drafts.append({**drafts[0], "id": f"it{k}-q0-d1", "sample": 1, "draft": "Too short.", "words": 2})
    _jsonl(d / "drafts.jsonl", drafts)
    # The length-biased resampling dropped the first draft (it is still extended here: only the final stage's
    # choice of files is under test).
    _jsonl(d / "resampled_drafts.jsonl", drafts[1:])
    extensions = [
        {"id": f"{r['id']}-x", "draft_id": r["id"], "sample": 0, "query_id": r["query_id"], "query": r["query"],
         "language": r["language"], "draft": r["draft"], "draft_words": r["words"], "extended": _text(k * 20 + i, 70),
         "words": 70, "ratio": round(70 / r["words"], 3), "tries": 1, "micro_iterations_accepted": 1}
        for i, r in enumerate(drafts[:2])]
    _jsonl(d / "extensions.jsonl", extensions + [{**extensions[0], "id": f"it{k}-q0-d0-y", "sample": 1}])
    _jsonl(d / "resampled_extensions.jsonl", extensions)
    (d / "adapters" / "generator").mkdir(parents=True)
    (d / "adapters" / "generator" / "adapter_config.json").write_text("{}")
    (d / "evaluation.json").write_text(json.dumps({"iteration": k, "run": "hand-made", "words": {}, "counts": {},
                                                   "figures": []}))


class Fakes:
    """load_engine and train_adapter stand-ins that record what they were given: each engine's adapters.
    Training with an engine still open fails, as it would on a GPU that engine holds."""

    def __init__(self, monkeypatch, scripted_engine):
        self.adapters, self.engines, self.open, self.trained = [], [], [], []

        def answer(request):
            if request.role is None:  # self-instruct: a new query
                return " ".join(random.Random(request.seed).sample(VOCAB, 9)) + "?"
            return _text(request.seed, 40)

        def load_engine(params, adapters=None):
            engine = scripted_engine(answer)
            engine.close = lambda: self.open.remove(engine)  # a second close fails too
            self.adapters.append(adapters)
            self.engines.append(engine)
            self.open.append(engine)
            return engine

        def train_adapter(params, examples_path, output_dir, init_adapter=None):
            assert not self.open, "an engine is open while the adapter trains"
            summary = {"samples": len(read_jsonl(examples_path)), "trained": True, "init_adapter": init_adapter}
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "slkit-train.json").write_text(json.dumps(summary))
            self.trained.append(summary)
            return summary

        monkeypatch.setattr("slkit.stages.common.load_engine", load_engine)
        monkeypatch.setattr("slkit.stages.length_control.train_adapter", train_adapter)


@pytest.fixture
def run_dir(tmp_path):
    params = load_params(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path), "evaluation.benchmark": None, "queries.languages": ["en"],
        "length_control.collect_queries": 2, "drafts.resample": False})
    run = params.run_dir
    run.mkdir(parents=True)
    dump_params(params, run / "params.yaml")
    _iteration(run, 1)
    return run


def _adapter(run, k):
    return str(adapter_dir(run, k, "generator"))


def test_final_stage_takes_drafts_extensions_and_a_collection_pass(run_dir, monkeypatch, scripted_engine):
    fakes = Fakes(monkeypatch, scripted_engine)
    summary = length_control_stage(run_dir, 1)
    out = run_dir / "length_control"
    # The collection: 2 new queries and their drafts, by the last iteration's Generator, written resumably.
    queries = read_jsonl(out / "queries.jsonl")
    assert sorted(q["id"] for q in queries) == ["collect-q0", "collect-q1"]
    assert sorted(d["id"] for d in read_jsonl(out / "drafts.jsonl")) == [
        "collect-q0-d0", "collect-q0-d1", "collect-q1-d0", "collect-q1-d1"]
    # One engine, holding that Generator: self-instruct on the base model (role None), drafts with the adapter.
    assert fakes.adapters == [{"generator": _adapter(run_dir, 1)}] and not fakes.open
    assert {r.role for r in fakes.engines[0].requests} == {None, "generator"}
    assert summary["collection"]["queries"] == 2 and summary["collection"]["drafts"] == 4
    records = read_jsonl(out / "constrained.jsonl")
    # The resampled drafts and extensions of the iteration (as the reference: not it1-q0-d0 nor it1-q0-d0-y,
    # which the resampling dropped), and the collected drafts; the query naming 500 words is skipped (draft and
    # extension), the 2-word draft is outside the window.
    assert sorted(r["id"] for r in records) == ["collect-q0-d0", "collect-q0-d1", "collect-q1-d0", "collect-q1-d1",
                                                "it1-q0-d0-x"]
    assert summary["skipped"] == {"names_length": 2}
    assert summary["sources"] == {"iter_1/resampled_extensions": 1, "length_control/drafts": 4}
    lc = load_params(run_dir / "params.yaml").length_control
    for r in records:  # checked here by LonGen's rule, not by the stage's own check
        c = r["constraint"]
        assert r["words"] == count_words(r["completion"])
        assert longen_accepts(c["kind"], c["low"], c["high"], r["words"]), r
        assert all(lc.min_words <= n <= lc.max_words and n % lc.round_to == 0 for n in (c["low"], c["high"]) if n)
    assert fakes.trained == [{"samples": 5, "trained": True, "init_adapter": _adapter(run_dir, 1)}]
    assert read_json(out / "length_control.done.json")["iteration"] == 1


def test_collect_queries_zero_turns_the_collection_off(run_dir, monkeypatch, scripted_engine):
    params = load_params(run_dir / "params.yaml", {"length_control.collect_queries": 0})
    dump_params(params, run_dir / "params.yaml")
    fakes = Fakes(monkeypatch, scripted_engine)
    summary = length_control_stage(run_dir, 1)
    assert summary["collection"] is None and fakes.adapters == []
    assert not (run_dir / "length_control" / "queries.jsonl").exists()
    assert summary["pairs"] == 1


def test_the_collected_drafts_go_through_the_drafts_resampling(run_dir, monkeypatch, scripted_engine):
    # the reference's collection runs its drafts step, which resamples by length like every drafts step
    params = load_params(run_dir / "params.yaml", {"drafts.resample": True, "length_control.collect_queries": 6})
    dump_params(params, run_dir / "params.yaml")
    Fakes(monkeypatch, scripted_engine)
    length_control_stage(run_dir, 1)
    out = run_dir / "length_control"
    collected = sorted(read_jsonl(out / "drafts.jsonl"), key=lambda r: r["id"])
    rp = params.resampling
    kept = resample_by_length(collected, random.Random(stable_seed(params.seed, COLLECTION, "resample drafts")),
                              rp.coefficient, rp.exponent, group="language")
    taken = {r["id"] for r in read_jsonl(out / "constrained.jsonl") if r["source"] == "length_control/drafts"}
    assert 0 < len(kept) < len(collected) and taken == {r["id"] for r in kept}


def test_the_collection_resumes_from_its_partial_records(run_dir, monkeypatch, scripted_engine):
    out = run_dir / "length_control"
    out.mkdir()
    (out / "after_iteration.json").write_text('{"iteration": 1}')
    kept = {"id": "collect-q0", "query": "Chronicle the lantern festivals of harbor villages.", "language": "en",
            "words": 7, "tries": 1}
    _jsonl(out / "queries.jsonl.partial", [kept])
    Fakes(monkeypatch, scripted_engine)
    length_control_stage(run_dir, 1)
    queries = {q["id"]: q for q in read_jsonl(out / "queries.jsonl")}
    assert set(queries) == {"collect-q0", "collect-q1"} and queries["collect-q0"] == kept


@pytest.mark.parametrize("killed", [False, True])
def test_raising_macro_iterations_reruns_the_final_stage(run_dir, monkeypatch, scripted_engine, killed):
    fakes = Fakes(monkeypatch, scripted_engine)
    length_control_stage(run_dir, 1)
    out = run_dir / "length_control"
    (out / "05_length_control.ipynb").write_text("{}")  # the executed notebook papermill is writing
    if killed:  # the stage after iteration 1 died before its done-marker: its files must not be reused either
        (out / "length_control.done.json").unlink()
    _iteration(run_dir, 2)
    assert not stage_done(run_dir, 2, "length_control")
    fakes.adapters.clear()
    summary = length_control_stage(run_dir, 2)
    assert fakes.adapters == [{"generator": _adapter(run_dir, 2)}]  # collected again with iteration 2's Generator
    assert summary["training"]["init_adapter"] == _adapter(run_dir, 2)  # trained again, from iteration 2's adapter
    assert {r["source"] for r in read_jsonl(out / "constrained.jsonl")} >= {"iter_1/resampled_extensions",
                                                                           "iter_2/resampled_extensions"}
    assert read_json(out / "length_control.done.json")["iteration"] == 2
    assert (out / "05_length_control.ipynb").exists()
    assert stage_done(run_dir, 2, "length_control") and not stage_done(run_dir, 1, "length_control")
    fakes.adapters.clear()
    assert length_control_stage(run_dir, 2) == summary and fakes.adapters == []  # done: skipped


def test_the_final_stage_of_a_later_iteration_is_never_thrown_away(run_dir, monkeypatch, scripted_engine):
    """Running it by hand with an earlier iteration (the notebook's default is 1) is refused, files kept."""
    Fakes(monkeypatch, scripted_engine)
    _iteration(run_dir, 2)
    length_control_stage(run_dir, 2)
    out = run_dir / "length_control"
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match="built after iteration 2; run the final stage with iteration 2"):
        length_control_stage(run_dir, 1)
    assert sorted(p.name for p in out.iterdir()) == before and stage_done(run_dir, 2, "length_control")


BENCHMARK = REPO / "tests" / "fixtures" / "longen_mini.jsonl"


def _set(run_dir, **overrides):
    dump_params(load_params(run_dir / "params.yaml", overrides), run_dir / "params.yaml")


def test_every_generation_before_training_shares_one_engine_closed_before_training(run_dir, monkeypatch,
                                                                                  scripted_engine):
    """In the stage's own process (backends other than vLLM): the collection (the Generator) and the model
    rewrites (the base model) share one engine, closed before training (the stand-in trainer fails while an
    engine is open); the scoring engine after training holds the new adapter."""
    _set(run_dir, **{"length_control.rewrite": "model", "evaluation.benchmark": str(BENCHMARK)})
    fakes = Fakes(monkeypatch, scripted_engine)
    summary = length_control_stage(run_dir, 1)
    final = str(run_dir / "length_control" / "adapters" / "generator")
    assert fakes.adapters == [{"generator": _adapter(run_dir, 1)}, {"generator": final}]
    assert len(fakes.trained) == 1 and not fakes.open
    before, scoring = fakes.engines
    assert {r.role for r in before.requests} == {None, "generator"}  # self-instruct and rewrites; drafts
    assert {r.role for r in scoring.requests} == {"generator"}  # so every rewrite ran on the first engine:
    assert summary["rewrites"].get("model", 0) + sum(summary["model_rewrites_refused"].values()) == summary["pairs"] > 0
    assert summary["length_after"]["n"] > 0


def _on_vllm_in_children(run_dir, monkeypatch, tmp_path, **overrides):
    """The run on engine.backend vllm with the fake vLLM importable in child processes only (on a CPU this
    process cannot import vllm, so an engine started here fails), logging each engine start and request with
    its process id. Returns the log's path."""
    _set(run_dir, **{"engine.backend": "vllm", "length_control.rewrite": "model",
                     "evaluation.benchmark": str(BENCHMARK), **overrides})
    log = tmp_path / "fake_vllm.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_VLLM), os.environ.get("PYTHONPATH")])))
    return log


def _events(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _train_here(monkeypatch, log):
    """A stand-in trainer in this process; returns the list of what the engines had logged when each training
    started."""
    seen = []

    def train_adapter(params, examples_path, output_dir, init_adapter=None):
        seen.append(_events(log))
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"samples": len(read_jsonl(examples_path)), "trained": True, "init_adapter": init_adapter}
        (output_dir / "slkit-train.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr("slkit.stages.length_control.train_adapter", train_adapter)
    return seen


def _adapters_used(events, pid):
    return {a for e in events if e["event"] == "generate" and e["pid"] == pid for a in e["adapters"]}


def test_on_vllm_each_engine_phase_runs_in_a_child_process_of_its_own(run_dir, monkeypatch, tmp_path,
                                                                       tiny_model_path, fake_vllm):
    """vLLM keeps a closed engine's GPU memory until its process ends, and a second engine after a slept one
    crashed on the H200: the collection and rewrites run in one child, the scoring in another, training here
    between them; this process starts no engine. What the stage writes is what the phases called in this
    process write (as the stage did before; the fake's answers depend on the request's seed only)."""
    here = tmp_path / "here" / run_dir.name
    shutil.copytree(run_dir, here)
    log = _on_vllm_in_children(run_dir, monkeypatch, tmp_path)  # the recipe's 85% of the card per engine
    trained = _train_here(monkeypatch, log)
    summary = length_control_stage(run_dir, 1)
    events = _events(log)
    starts = [e["pid"] for e in events if e["event"] == "start"]
    assert len(starts) == len(set(starts)) == 2 and os.getpid() not in starts
    constrain, score = starts
    # Training started once, when only the first child's engine had started (and its process had ended).
    assert len(trained) == 1 and [e["pid"] for e in trained[0] if e["event"] == "start"] == [constrain]
    final = str(run_dir / "length_control" / "adapters" / "generator")
    assert _adapters_used(events, constrain) == {None, _adapter(run_dir, 1)}  # self-instruct + rewrites; drafts
    assert _adapters_used(events, score) == {final}
    assert summary["collection"]["drafts"] > 0 and sum(summary["model_rewrites_refused"].values()) == summary["pairs"]
    assert summary["length_after"]["n"] > 0 and summary["training"]["init_adapter"] == _adapter(run_dir, 1)

    # The same run in this process: two engines of 45% fit one process of the fake.
    monkeypatch.delenv("FAKE_VLLM_LOG")
    _set(here, **{"engine.backend": "vllm", "length_control.rewrite": "model", "evaluation.benchmark": str(BENCHMARK),
                  "engine.vllm.gpu_memory_utilization": 0.45})
    monkeypatch.setattr("slkit.stages.length_control.run_in_child",
                        lambda phase, run, k: PHASES[phase](run, k, load_params(run / "params.yaml")))
    length_control_stage(here, 1)
    assert len(fake_vllm.llms) == 2
    for name in ["queries.jsonl", "drafts.jsonl", "constrained.jsonl", "generator_sft.jsonl", "benchmark_outputs.jsonl"]:
        assert read_jsonl(run_dir / "length_control" / name) == read_jsonl(here / "length_control" / name), name
    in_children, in_process = (read_json(d / "length_control" / "length_control.json") for d in (run_dir, here))
    assert in_children.pop("training")["init_adapter"] == _adapter(run_dir, 1)  # paths of each run directory
    assert in_process.pop("training")["init_adapter"] == _adapter(here, 1)
    assert in_children == in_process


def test_a_failing_child_stops_the_stage_with_its_error_and_a_rerun_resumes(run_dir, monkeypatch, tmp_path,
                                                                            tiny_model_path):
    """The scoring child fails as the second engine did on the H200: the stage raises the child's error, keeps
    the constrained pairs and the trained adapter, and a rerun starts only the scoring engine."""
    log = _on_vllm_in_children(run_dir, monkeypatch, tmp_path)
    trained = _train_here(monkeypatch, log)
    out = run_dir / "length_control"
    monkeypatch.setenv("FAKE_VLLM_FAIL_ON_ADAPTER", str(out / "adapters" / "generator"))
    with pytest.raises(ChildPhaseError, match="the score phase failed in its child process: RuntimeError: CUDA error: "
                                              "an illegal memory access was encountered"):
        length_control_stage(run_dir, 1)
    assert (out / "constrained.json").exists() and not stage_done(run_dir, 1, "length_control")
    kept = {name: (out / name).read_text() for name in ["queries.jsonl", "drafts.jsonl", "constrained.jsonl"]}
    monkeypatch.delenv("FAKE_VLLM_FAIL_ON_ADAPTER")
    before = len(_events(log))
    summary = length_control_stage(run_dir, 1)
    again = _events(log)[before:]
    assert [e["event"] for e in again if e["event"] == "start"] == ["start"]
    assert _adapters_used(again, again[0]["pid"]) == {str(out / "adapters" / "generator")}
    assert len(trained) == 1 and all((out / name).read_text() == text for name, text in kept.items())
    assert summary["length_after"]["n"] > 0 and stage_done(run_dir, 1, "length_control")


def test_out_of_memory_in_a_child_stops_the_stage_with_the_params_to_lower(run_dir, monkeypatch):
    def phase(name, run, k, backend):
        raise ChildPhaseError(name, "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("slkit.stages.length_control.run_phase", phase)
    with pytest.raises(MemoryError, match="out of GPU memory in stage length_control .*lower engine.batch_size"):
        length_control_stage(run_dir, 1)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_phase_child_ends_when_its_stage_process_is_killed():
    """`slkit run` stops an orphaned kernel with SIGKILL: the kernel's phase child must not live on holding the
    GPU's memory."""
    child_code = ("from slkit.stages.length_control import _end_with_parent; _end_with_parent(); import time; "
                  "print('ready', flush=True); time.sleep(120)")
    stage_code = (f"import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', {child_code!r}]); "
                  "print(child.pid, flush=True); child.wait()")
    stage = subprocess.Popen([sys.executable, "-c", stage_code], stdout=subprocess.PIPE, text=True)
    child = int(stage.stdout.readline())
    try:
        assert stage.stdout.readline().strip() == "ready"
        stage.kill()
        stage.wait()
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.1)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
