"""Jobs at their own pace (slkit.engines.jobs): the same records as lockstep batches, the tail cut at
finish_share, failures, and the early stop of texts that already repeat an n-gram (slkit.method.quality)."""
import hashlib
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from slkit.core.params import JudgeParams, QualityParams, SamplingParams, params_from_dict
from slkit.core.records import RecordWriter
from slkit.engines.base import Generated, Request, postprocess
from slkit.engines.jobs import jobs_target, run_jobs
from slkit.evaluation.judge import judge_responses
from slkit.method.drafts import write_drafts
from slkit.method.extensions import extend_drafts
from slkit.method.quality import RepetitionWatch, quality_failure, settled_text
from slkit.method.textstats import count_words, ngram_units

WORDS = "the a river stone light morning city garden letter window road music".split()


def _text(request: Request) -> str:
    """A deterministic answer to a request: 2-6 paragraphs of words drawn by its prompt, prefill and seed; one in
    four repeats itself (fails the quality check), one in five is short of a sentence end."""
    rng = random.Random(hashlib.sha256(f"{request.prompt}|{request.prefill}|{request.seed}".encode()).digest())
    paragraphs = [" ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(rng.randint(8, 30))) + "."
                  for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.25:
        paragraphs.append(paragraphs[0])
    if rng.random() < 0.2:
        paragraphs[-1] = paragraphs[-1][:-1]
    return "\n\n".join(paragraphs)


class LockstepEngine:
    """Batches only: what the transformers engine offers."""
    is_chat = True
    structured_outputs = False

    def __init__(self):
        self.batches = []

    def render(self, message):
        return f"<user>{message}</user>"

    def generate(self, requests, sampling, on_done=None):
        self.batches.append(len(requests))
        return [Generated(_text(r)) for r in requests]


class SubmittingEngine(LockstepEngine):
    """One request at a time on worker threads, finishing in a random order (a server's)."""

    def __init__(self, workers=4, fail_after=None):
        super().__init__()
        self.pool = ThreadPoolExecutor(workers)
        self.max_in_flight = workers
        self.running = self.most_running = self.submitted = 0
        self.fail_after = fail_after
        self.lock = threading.Lock()
        self.abandoned = []

    def _answer(self, request):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(random.random() * 0.002)
        with self.lock:
            self.running -= 1
        return Generated(_text(request))

    def submit(self, request, sampling):
        self.submitted += 1
        if self.fail_after is not None and self.submitted > self.fail_after:
            raise ConnectionError("the server went away")
        return self.pool.submit(self._answer, request)

    def abandon(self, futures):
        self.abandoned += futures


def _params(**sections):
    return params_from_dict({"run_name": "t", "model": {"path": "builtin:tiny-random-llama"}, **sections})


def _queries(n=12):
    return [{"id": f"it1-q{i}", "query": f"Write about topic {i}.", "language": "en"} for i in range(n)]


def _drafts(tmp_path, engine, params, name="drafts.jsonl"):
    with RecordWriter(tmp_path / name) as writer:
        counts = write_drafts(engine, _queries(), params, 1, writer, params.quality)
        return sorted(writer.finish(), key=lambda r: r["id"]), counts


def test_drafts_at_their_own_pace_are_the_lockstep_drafts(tmp_path):
    params = _params(drafts={"max_tries": 4, "finish_share": 1.0})
    lockstep, lockstep_counts = _drafts(tmp_path, LockstepEngine(), params, "a.jsonl")
    engine = SubmittingEngine()
    own_pace, own_pace_counts = _drafts(tmp_path, engine, params, "b.jsonl")
    assert own_pace == lockstep and own_pace_counts == lockstep_counts
    assert 0 < len(lockstep) < 24 and lockstep_counts["gave_up"] > 0  # retries and give-ups happened
    assert 1 < engine.most_running <= engine.max_in_flight


def test_extensions_at_their_own_pace_are_the_lockstep_extensions(tmp_path):
    params = _params(extensions={"max_tries": 3, "micro_iterations": 2, "min_ratio": 1.1, "finish_share": 1.0})
    drafts, _ = _drafts(tmp_path, LockstepEngine(), _params(drafts={"finish_share": 1.0}))
    results = []
    for name, engine in (("a", LockstepEngine()), ("b", SubmittingEngine(workers=6))):
        with RecordWriter(tmp_path / f"x{name}.jsonl") as writer:
            counts = extend_drafts(engine, drafts, params, 1, writer, params.quality)
            results.append((sorted(writer.finish(), key=lambda r: r["id"]), counts))
    assert results[0] == results[1]
    records, counts = results[0]
    assert records and counts["retried"] > 0 and counts["micro_iteration_rejected_repetition"] > 0
    assert all(len(r["micro_iterations"]) == 2 * r["tries"] for r in records)


def test_the_judge_at_its_own_pace_writes_the_lockstep_judgements(tmp_path):
    items = [{"index": i, "sample": 0, "query": f"q{i}", "output": f"answer {i}"} for i in range(10)]

    class JsonSometimes(SubmittingEngine):
        def _answer(self, request):
            ok = random.Random(request.seed).random() < 0.5
            return Generated('{"relevance": 7, "coherence": 6, "accuracy": 5, "consistency": 8, "clarity": 7, '
                             '"creativity": 4, "engagement": 6}' if ok else "I think it is fine.")

    lockstep = JsonSometimes()
    lockstep.submit = None
    del lockstep.submit
    results = []
    for name, engine in (("a", type("Batching", (LockstepEngine,), {"generate": lambda self, rs, s, on_done=None: [
            JsonSometimes._answer(self, r) for r in rs]})()), ("b", JsonSometimes())):
        with RecordWriter(tmp_path / f"j{name}.jsonl") as writer:
            judge_responses(engine, items, JudgeParams(enabled=True, max_tries=3), 0, writer)
            results.append(sorted(writer.finish(), key=lambda r: r["index"]))
    assert results[0] == results[1]
    assert {r["tries"] for r in results[0]} > {1} and any(r["failed"] for r in results[0])


@pytest.mark.parametrize("engine_type", [LockstepEngine, SubmittingEngine])
def test_a_stage_ends_at_finish_share_and_drops_the_rest(tmp_path, engine_type):
    params = _params(drafts={"max_tries": 20, "finish_share": 0.75})
    records, counts = _drafts(tmp_path, engine_type(), params)
    ended = len(records) + counts["gave_up"]
    assert counts["dropped"] > 0 and ended + counts["dropped"] == 24
    assert ended >= jobs_target(24, 0.75) == 18


def test_finish_share_counts_the_jobs_a_resumed_stage_ended_before():
    def job():
        yield Request("p", None, 4), SamplingParams()

    run = run_jobs(LockstepEngine(), [job() for _ in range(2)], finish_share=0.5, ended_before=8)
    assert (run.ended, run.dropped) == (0, 2)  # 8 of 10 ended before: the target (5) is already met


def test_a_failing_request_stops_the_stage_and_keeps_the_records_written(tmp_path):
    params = _params(drafts={"max_tries": 3, "finish_share": 1.0})
    engine = SubmittingEngine(workers=2, fail_after=10)
    with pytest.raises(ConnectionError, match="went away"):
        with RecordWriter(tmp_path / "drafts.jsonl") as writer:
            write_drafts(engine, _queries(), params, 1, writer, params.quality)
    kept = (tmp_path / "drafts.jsonl.partial").read_text().splitlines()
    assert 0 < len(kept) < 10  # records of the jobs that ended before the failure


# --- the early stop of texts that already repeat an n-gram ---------------------------------------------------


PIECES = ["word", "the", "cat", ".", "!", "?", " ", " ", " ", "\n", "\n\n", "2.", "- ", "# ", "**", "```", "3.5",
          "e.g", "「", "」", "。", "好", "天", '"', "---", "\n\n\n", ")"]


def test_settled_text_is_a_prefix_of_the_final_text_unit_for_unit():
    """Whatever the generation writes next, the units of settled_text (but its last) begin the units of the text
    the engines make of the whole generation: a repetition found there is in the final text."""
    rng = random.Random(0)
    for _ in range(600):
        sampling = SamplingParams(trim_unfinished=rng.random() < 0.8,
                                  stop=rng.choice([[], ["\n\n\n", "---"], ["\n---"]]))
        raw = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 50)))
        final = postprocess(raw, sampling)
        for language in ("en", "zh"):
            units = ngram_units(final, language)
            for cut in range(len(raw) + 1):
                settled = ngram_units(settled_text(raw[:cut], sampling), language)[:-1]
                assert units[:len(settled)] == settled, (raw[:cut], raw)


def _loop(language: str, rng: random.Random) -> str:
    """A text that starts well and falls into a loop, as small models do at the token cap."""
    if language == "zh":
        head = "".join(rng.choice("天地人和风雨山水花草春秋日月星辰") for _ in range(40)) + "。\n\n"
        return head + ("我们应该珍惜时间，努力学习，不断进步。\n" * 30)
    head = " ".join(rng.choice(WORDS) + str(rng.randrange(99)) for _ in range(30)) + ".\n\n"
    return head + "We must always remember that the journey matters more than the destination itself.\n" * 30


@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_early_stop_fires_on_loops_and_never_changes_a_verdict(language):
    """Replay texts through both paths, stream (chunks of a few characters, checked as the endpoint engine
    checks them) and whole: a stopped text is one the quality check rejects for its repetition, and texts
    the check accepts are never stopped."""
    rules, sampling = QualityParams(), SamplingParams()
    rng = random.Random(1)
    texts = [_loop(language, rng) for _ in range(5)]
    texts += [_text(Request(f"p{i}", None, 1, i)) for i in range(40)]
    if language == "zh":
        texts += ["".join(rng.choice("天地人和风雨山水花草春秋日月星辰木火土金") for _ in range(300)) + "。" for _ in range(5)]
    stopped_at = {}
    for i, raw in enumerate(texts):
        watch = RepetitionWatch(language, rules, sampling)
        for end in range(7, len(raw) + 7, 7):
            if watch(raw[:end]):
                stopped_at[i] = end
                break
        verdict = quality_failure(postprocess(raw, sampling), language, rules)
        if i in stopped_at:
            assert verdict == "repetition"
            stopped = postprocess(raw[:stopped_at[i]], sampling)
            assert quality_failure(stopped, language, rules) is not None
        # (a repetition in a text's last line is found only when the text ends: such texts run to their end)
    assert set(range(5)) <= set(stopped_at)  # every loop stopped...
    assert all(stopped_at[i] < len(texts[i]) / 2 for i in range(5))  # ...before half of it was written
    assert any(quality_failure(postprocess(t, sampling), language, rules) is None for t in texts)


def test_an_extension_micro_iteration_stopped_early_is_rejected_with_its_kept_head():
    """Phase 2's check reads the kept head and the continuation as the micro-iteration joins them."""
    rules, sampling = QualityParams(), SamplingParams()
    head = "A garden at dawn holds more than flowers and stone.\n\nThe river runs past the old mill wheel."
    prefill = head  # slkit.method.extensions.phase2_prefill
    continuation = "The river runs past the old mill wheel and the garden at dawn holds more.\n" * 3
    watch = RepetitionWatch("en", rules, sampling, head, prefill)
    assert watch(prefill + continuation)
    joined = head + "\n\n" + postprocess(continuation, sampling)
    assert quality_failure(joined, "en", rules) == "repetition"
    assert not RepetitionWatch("en", rules, sampling, head, prefill)(prefill + "Fresh words follow here.\nMore.")


def test_the_watch_reads_only_new_units():
    rules, sampling = QualityParams(), SamplingParams()
    watch = RepetitionWatch("en", rules, sampling)
    text = " ".join(f"w{i}" for i in range(500)) + ".\n"
    assert not watch(text)
    seen = len(watch.seen)
    assert not watch(text + "more words.\nx")
    assert len(watch.seen) == seen + 2  # the n-grams that end in the two new settled units
    assert count_words(text) == 500
    assert Counter(len(g) for g in watch.seen) == Counter({rules.ngram_en: len(watch.seen)})


class StoppingEngine(LockstepEngine):
    """Every text comes back as its RepetitionWatch would end it: cut short and flagged stopped_early."""

    def generate(self, requests, sampling, on_done=None):
        return [Generated(_text(r).split(".")[0], stopped_early=True) for r in requests]


def test_a_draft_stopped_early_is_counted_as_repetition(tmp_path):
    """The cut text would fail the length and ending checks first; the reason counted is why it was cut."""
    params = _params(drafts={"max_tries": 2, "finish_share": 1.0})
    records, counts = _drafts(tmp_path, StoppingEngine(), params)
    assert records == []
    slots = 12 * params.drafts.samples_per_query
    assert counts == Counter({"repetition": params.drafts.max_tries * slots, "gave_up": slots})
    cut = Generated("Too short, no end", stopped_early=True)
    assert quality_failure(cut, "en") == "unfinished"  # the text alone says nothing of why it was cut
    assert quality_failure(cut, "en", stopped_early=True) == "repetition"
