"""The stages' wiring with a scripted engine (no model): which adapters each stage generates with,
the drafts' resampling before extension, and the benchmark subset."""
import importlib
import json
import random
from collections import defaultdict

import pytest

from conftest import REPO, ScriptedEngine
from slkit.core.layout import BASELINE, adapter_dir, iter_dir, load_run_params
from slkit.core.registry import ITERATION_STAGES
from slkit.stages.evaluation import evaluation_stage, score_benchmark
from slkit.stages.extensions import extensions_stage
from slkit.running.pipeline import prepare_run
from slkit.core.records import read_jsonl, write_jsonl_atomic

BENCHMARK = REPO / "tests" / "fixtures" / "longen_mini.jsonl"


def _words(tag, n):
    return " ".join(f"{tag}w{i}" for i in range(n))


def _answer(request):
    """Distinct, clean texts of each kind: new queries (en/zh), drafts and benchmark answers, extensions."""
    tag = f"s{request.seed}"
    if request.role is None:  # self-instruct: a new instruction in the language of the examples
        rng = random.Random(request.seed)
        if request.prompt.endswith("指令3："):
            return "".join(chr(0x4E00 + rng.randrange(20000)) for _ in range(12)) + "。"
        return " Write about " + " ".join("".join(rng.choice("bcfhjkmpqvxz") for _ in range(7)) for _ in range(6)) + "."
    if request.role == "generator":
        return _words(tag, 30) + "."
    return "\n\n".join(_words(f"{tag}p{p}", 60) + "." for p in range(3))  # extender: long enough for 1.2x


class RecordingEngine(ScriptedEngine):
    """Scripted answers; logs, per request, the stage it came from and the adapter it ran with (the
    role's adapter, or the base model: None)."""

    def __init__(self, adapters, log, where):
        super().__init__(_answer)
        self.adapters, self.log, self.where = adapters, log, where

    def generate(self, requests, sampling, on_done=None):
        for r in requests:
            self.log.append((*self.where, r.role, self.adapters.get(r.role) if r.role else None))
        return super().generate(requests, sampling, on_done)


def fake_train(params, examples_path, output_dir, init_adapter=None):
    """train_adapter's files and summary, without a model: an adapter config and slkit-train.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {"samples": len(read_jsonl(examples_path)), "trained": True, "init_adapter": init_adapter}
    (output_dir / "adapter_config.json").write_text("{}")
    (output_dir / "slkit-train.json").write_text(json.dumps(summary))
    return summary


@pytest.fixture
def scripted_run(tmp_path, monkeypatch):
    """A smoke run directory whose stages generate with a RecordingEngine and train fake adapters."""
    log, where = [], [None, None]
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters=None: RecordingEngine(adapters or {}, log, where))
    monkeypatch.setattr("slkit.stages.training.train_adapter", fake_train)
    monkeypatch.setattr("slkit.stages.evaluation.write_iteration_figures", lambda *a: [])
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path), "macro_iterations": 3, "evaluation.benchmark": str(BENCHMARK),
        "evaluation.judge.enabled": False})
    return run_dir, log, where


def test_iteration_k_generates_with_iteration_k_minus_1_adapters(scripted_run):
    run_dir, log, where = scripted_run
    for k in (1, 2, 3):
        for stage in ITERATION_STAGES:
            where[:] = [k, stage]
            getattr(importlib.import_module(f"slkit.stages.{stage}"), f"{stage}_stage")(run_dir, k)
    used = defaultdict(set)
    for k, stage, role, adapter in log:
        used[k, stage, role].add(adapter)
    assert {(stage, role) for _, stage, role in used} == {
        ("queries", None), ("drafts", "generator"), ("extensions", "extender"), ("evaluation", "generator")}

    def adapter(k, role):
        return str(adapter_dir(run_dir, k, role)) if k else None

    for k in (1, 2, 3):
        # self-instruct always runs on the base model (as in the reference)
        assert used[k, "queries", None] == {None}
        # drafts and extensions: the previous iteration's adapters, the base model in iteration 1
        assert used[k, "drafts", "generator"] == {adapter(k - 1, "generator")}
        assert used[k, "extensions", "extender"] == {adapter(k - 1, "extender")}
        # the evaluation scores the Generator this iteration trained
        assert used[k, "evaluation", "generator"] == {adapter(k, "generator")}
        train = json.loads((iter_dir(run_dir, k) / "training.done.json").read_text())["summary"]
        assert train["generator"]["init_adapter"] == adapter(k - 1, "generator")
        assert train["extender"]["init_adapter"] == adapter(k - 1, "extender")


def _drafts():
    """20 English drafts of 10-29 words and 20 Chinese-labelled ones of 100-119, in shuffled order."""
    drafts = [{"id": f"{lang}-q{i:02d}-d0", "query_id": f"{lang}-q{i:02d}", "query": "Write long.", "language": lang,
               "sample": 0, "draft": _words(f"{lang}{i}", base + i - 1) + ".", "words": base + i, "tries": 1}
              for lang, base in (("en", 10), ("zh", 100)) for i in range(20)]
    random.Random(1).shuffle(drafts)
    return drafts


def _write_drafts(run_dir, drafts):
    iter_dir(run_dir, 1).mkdir(parents=True)
    write_jsonl_atomic(iter_dir(run_dir, 1) / "drafts.jsonl", drafts)


def test_drafts_are_resampled_by_length_before_extension_reproducibly(scripted_run):
    run_dir, log, where = scripted_run
    drafts = _drafts()
    _write_drafts(run_dir, drafts)
    summary = extensions_stage(run_dir, 1)
    kept = read_jsonl(iter_dir(run_dir, 1) / "resampled_drafts.jsonl")
    kept_ids = [d["id"] for d in kept]
    assert kept_ids == sorted(kept_ids) and set(kept_ids) < {d["id"] for d in drafts}
    for lang, base in (("en", 10), ("zh", 100)):
        words = [d["words"] for d in kept if d["language"] == lang]
        # ranked within the language: the shortest 20% (r > 0.8) always go, longer ones mostly stay
        assert 0 < len(words) < 20 and min(words) >= base + 4
    assert summary["drafts"] == 40 and summary["resampled_drafts"] == len(kept)
    assert summary["jobs"] == 2 * len(kept)  # extensions.samples_per_draft jobs per kept draft
    extensions = read_jsonl(iter_dir(run_dir, 1) / "extensions.jsonl")
    assert {e["draft_id"] for e in extensions} == set(kept_ids) and len(extensions) == summary["jobs"]

    # the same drafts in another file order (a resumed generate stage) give the same resampled drafts
    other = run_dir.parent / "other"
    other.mkdir()
    (other / "params.yaml").write_text((run_dir / "params.yaml").read_text())
    _write_drafts(other, list(reversed(drafts)))
    extensions_stage(other, 1)
    assert [d["id"] for d in read_jsonl(iter_dir(other, 1) / "resampled_drafts.jsonl")] == kept_ids


def test_benchmark_subset_size_null_scores_the_whole_benchmark(scripted_run):
    run_dir, log, where = scripted_run
    params = load_run_params(run_dir)
    for size, n in ((None, len(read_jsonl(BENCHMARK))), (4, 4)):
        out = run_dir / f"eval-{size}"
        out.mkdir()
        p = params.model_copy(update={"evaluation": params.evaluation.model_copy(
            update={"subset_size": size, "samples_per_query": 1})})
        assert score_benchmark(p, {}, out, "evaluation")["n"] == n


def test_max_required_words_leaves_longer_targets_out_of_the_subset(scripted_run):
    from slkit.evaluation.benchmarks import load_benchmark

    run_dir, log, where = scripted_run
    params = load_run_params(run_dir)
    _, items = load_benchmark(str(BENCHMARK))
    limit = sorted(item["required"] for item in items)[len(items) // 2]
    out = run_dir / "eval-short"
    out.mkdir()
    p = params.model_copy(update={"evaluation": params.evaluation.model_copy(
        update={"subset_size": None, "samples_per_query": 1, "max_required_words": limit})})
    scores = score_benchmark(p, {}, out, "evaluation")
    answered = read_jsonl(out / "benchmark_outputs.jsonl")
    assert 0 < scores["n"] == sum(item["required"] <= limit for item in items) < len(items)
    assert max(r["required"] for r in answered) <= limit


def test_the_evaluate_stage_starts_one_engine_for_the_benchmark_and_its_own_judge(tmp_path, monkeypatch):
    """vLLM keeps its GPU memory until the stage's process ends, so a second engine in the evaluate stage
    did not fit on the H200 (20 of 140 GiB free): the self-judge must reuse the benchmark's engine (as the
    base model), and a judge with a model of its own gets its own engine."""
    loaded = []

    def load(params, adapters=None):
        loaded.append((params.model.path, dict(adapters or {})))
        return RecordingEngine(adapters or {}, [], [0, "evaluation"])

    monkeypatch.setattr("slkit.stages.common.load_engine", load)
    monkeypatch.setattr("slkit.stages.evaluation.write_iteration_figures", lambda *a: [])
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path), "evaluation.benchmark": str(BENCHMARK), "evaluation.judge.enabled": True,
        "evaluation.judge.max_tries": 1})
    metrics = evaluation_stage(run_dir, BASELINE)
    assert metrics["judge"] and len(loaded) == 1
    assert len(read_jsonl(iter_dir(run_dir, BASELINE) / "judgements.jsonl")) > 0

    loaded.clear()
    judge_model = str(tmp_path / "judge-model")
    (tmp_path / "judge-model").mkdir()
    (tmp_path / "judge-model" / "config.json").write_text("{}")
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path), "run_name": "own-judge", "evaluation.benchmark": str(BENCHMARK),
        "evaluation.judge.enabled": True, "evaluation.judge.max_tries": 1,
        "evaluation.judge.model": {"path": judge_model}})
    evaluation_stage(run_dir, BASELINE)
    assert [path for path, _ in loaded] == ["builtin:tiny-random-llama", judge_model]
