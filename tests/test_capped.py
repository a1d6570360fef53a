"""Which outputs max_new_tokens cut: each backend says it (transformers: no end token within the cap; vLLM and
servers: finish_reason "length"; a stop string means the model ended the text), and the stage summaries count it."""
import json

from conftest import REPO, ScriptedEngine
from slkit.engines.base import CapTally, Generated, Request, finished
from slkit.core.params import SamplingParams
from slkit.running.pipeline import prepare_run
from slkit.core.layout import iter_dir
from slkit.core.records import write_jsonl_atomic
from slkit.stages.drafts import drafts_stage

GREEDY = SamplingParams(temperature=0, stop=["---"])


def test_a_stop_string_in_a_text_at_the_cap_means_the_model_ended_it():
    assert finished("one two three", GREEDY, at_cap=True).cut is True
    assert finished("one two three", GREEDY, at_cap=False).cut is False
    text = finished("one two\n---\nthree four", GREEDY, at_cap=True)  # the cap came after the answer's end
    assert text == "one two" and text.cut is False
    assert json.dumps({"output": text}) == '{"output": "one two"}'  # a Generated is written as its text


def test_the_tally_counts_cut_texts_per_cap():
    tally = CapTally()
    tally.add([Request("p", None, 64), Request("p", None, 64), Request("p", None, 4)],
              [Generated("a", cut=True), Generated("b", stopped_early=True), Generated("yes", cut=True)])
    tally.add([Request("p", None, 64)], ["plain text from a scripted engine"])
    assert tally.summary() == {"outputs": 4, "cut": 2, "share": 0.5, "stopped_early": 1, "by_max_new_tokens": {
        "4": {"outputs": 1, "cut": 1, "share": 1.0}, "64": {"outputs": 3, "cut": 1, "share": 0.3333}}}


def test_the_drafts_summary_counts_the_drafts_the_cap_cut(tmp_path, monkeypatch):
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path)})
    queries = [{"id": f"it1-q{i}", "query": f"Write about topic {i}.", "language": "en", "words": 4, "tries": 1} for i in range(5)]
    iter_dir(run_dir, 1).mkdir()
    write_jsonl_atomic(iter_dir(run_dir, 1) / "queries.jsonl", queries)
    engine = ScriptedEngine(lambda r: Generated(" ".join(f"w{i}" for i in range(60)) + ".", cut=r.seed % 3 == 0))
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda *args: engine)
    summary = drafts_stage(run_dir, 1)
    cut = sum(r.seed % 3 == 0 for r in engine.requests)
    assert 0 < cut < len(engine.requests) == 10  # 5 queries x 2 samples, each accepted at once
    assert summary["capped"] == {"outputs": 10, "cut": cut, "share": round(cut / 10, 4), "stopped_early": 0,
                                 "by_max_new_tokens": {"48": {"outputs": 10, "cut": cut, "share": round(cut / 10, 4)}}}


def test_transformers_marks_a_text_cut_when_no_end_token_came_within_the_cap(smoke_params, tiny_model_path):
    from slkit.engines.transformers import TransformersEngine

    engine = TransformersEngine(smoke_params)
    request = Request(engine.render("Tell me a story."), None, 6)
    decoded, decode = [], engine.tokenizer.decode
    engine.tokenizer.decode = lambda ids, **kw: decoded.append(ids.tolist()) or decode(ids, **kw)
    [capped] = engine.generate([request], SamplingParams(temperature=0, stop=[]))
    assert capped.cut is True and len(decoded[0]) == 6  # a random model writes no end token in 6 tokens
    engine.eos_ids = [decoded[0][2]]  # now the same greedy answer ends at its third token, within the cap
    [ended] = engine.generate([request], SamplingParams(temperature=0, stop=[]))
    assert ended.cut is False and len(decoded[1]) < 6


def test_vllm_marks_a_text_cut_when_its_finish_reason_is_length(smoke_params, fake_vllm):
    from slkit.engines.vllm import VLLMEngine

    engine = VLLMEngine(smoke_params)
    short, long = engine.generate([Request("p", None, 8, seed=1), Request("p", None, 400, seed=2)], smoke_params.sampling)
    assert (short.cut, long.cut) == (True, False)  # the fake stops at 40 tokens: "length" below that


def test_vllm_reports_each_finished_request(smoke_params, fake_vllm):
    """vLLM's LLM.generate updates its progress bar per finished request: the engine hands each update on,
    so a stage's progress moves within one call of 1,024 requests."""
    from slkit.engines.vllm import VLLMEngine

    done = []
    VLLMEngine(smoke_params).generate([Request("p", None, 8, seed=i) for i in range(5)], smoke_params.sampling,
                                      done.append)
    assert done == [1, 1, 1, 1, 1]  # was [5]: one call, one step
