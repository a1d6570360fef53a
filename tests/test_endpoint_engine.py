"""The OpenAI-compatible endpoint engine against real servers: `transformers serve` processes serving
the tiny model on this CPU (marker `server`; CI runs them, ~1 min). Request bodies are unit-tested too."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port
from slkit.engines.endpoint import EndpointEngine, adapter_name, request_body
from slkit.engines.base import Request
from slkit.engines.transformers import TransformersEngine
from slkit.core.params import SamplingParams
from slkit.core.layout import iter_dir
from slkit.stages.evaluation import evaluation_stage

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
GREEDY = SamplingParams(temperature=0, stop=[])


def _start_server(model_dir: Path, log: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    serve = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(serve), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("transformers serve did not start in 120 s")


@pytest.fixture(scope="module")
def served_model(tiny_model_path, tmp_path_factory):
    """The tiny model with a small chat template, served twice (a two-server pool)."""
    model_dir = tmp_path_factory.mktemp("served") / "tiny-chat"
    shutil.copytree(tiny_model_path, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["do_sample"] = True  # transformers serve samples only when the model's generation config does
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    servers = [_start_server(model_dir, model_dir.parent / f"server{i}.log") for i in range(2)]
    yield model_dir, [url for _, url in servers]
    for proc, _ in servers:
        proc.terminate()
        proc.wait(timeout=30)


def _params(smoke_params, model_dir, **endpoint):
    from slkit.core.params import params_from_dict

    data = smoke_params.to_dict()
    data["model"]["path"] = str(model_dir)
    data["engine"].update(backend="openai", endpoint={"adapters": "none", "vllm_sampling": False, "max_retries": 0,
                                                        "timeout_s": 60.0, **endpoint})
    return params_from_dict(data)


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


pytestmark = pytest.mark.server


def test_completions_match_the_local_engine_and_spread_over_servers(served_model, smoke_params):
    model_dir, urls = served_model
    params = _params(smoke_params, model_dir, base_urls=urls, concurrency=2)
    engine = EndpointEngine(params)
    local = TransformersEngine(params)
    assert engine.render("Hi") == local.render("Hi") == "<user>Hi</user>\n<assistant>"
    requests = [Request(engine.render(f"Write about topic {i}."), None, 12, seed=i, prefill="Sure" if i % 2 else "")
                for i in range(6)]
    done = []
    remote = engine.generate(requests, GREEDY, on_done=done.append)
    # greedy decoding of the same rendered text (pre-fill included, one <bos>) gives the same tokens
    assert remote == local.generate(requests, GREEDY)
    assert sum(done) == len(requests) and all(remote)
    engine.close()


def test_chat_api_sends_the_message_and_the_server_applies_its_template(served_model, smoke_params):
    model_dir, urls = served_model
    engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=urls[:1], api="chat"))
    local = TransformersEngine(_params(smoke_params, model_dir))
    assert engine.is_chat and engine.render("Hello") == "Hello"
    [remote] = engine.generate([Request("Hello", None, 10)], GREEDY)
    [expected] = local.generate([Request(local.render("Hello"), None, 10)], GREEDY)
    assert remote == expected
    with pytest.raises(ValueError, match="api: chat cannot pre-fill"):
        engine.generate([Request("Hello", None, 10, prefill="Once")], GREEDY)


def test_a_dead_server_is_skipped_and_all_dead_is_one_clear_error(served_model, smoke_params):
    model_dir, urls = served_model
    engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=[_dead_url(), urls[0]], timeout_s=5.0))
    out = engine.generate([Request(f"x{i}", None, 4, seed=i) for i in range(4)], GREEDY)
    assert len(out) == 4 and all(out)
    dead = _dead_url()
    engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=[dead], timeout_s=5.0, max_retries=1))
    with pytest.raises(RuntimeError, match="every server failed") as err:
        engine.generate([Request("x", None, 4)], GREEDY)
    assert dead in str(err.value)


def test_a_refused_request_is_not_retried_on_other_servers(served_model, smoke_params):
    model_dir, urls = served_model
    engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=urls, model="no-such-model"))
    with pytest.raises(RuntimeError, match="request refused"):
        engine.generate([Request("x", None, 4)], GREEDY)


def test_the_pipeline_runs_on_servers_and_the_key_never_reaches_a_file(served_model, smoke_params, tmp_path):
    """Seed -> generate -> extend -> train -> evaluate (and its judge) through the endpoint engine, with an
    API key set: no file of the run (records, metrics, executed notebooks, logs, params) holds the key."""
    from slkit.running.loop import run_loop

    model_dir, urls = served_model
    secret = "sk-slkit-test-9f8e7d6c5b4a"
    params = _params(smoke_params, model_dir, base_urls=urls, api_key_env="SLKIT_TEST_KEY")
    os.environ["SLKIT_TEST_KEY"] = secret
    try:
        data = params.to_dict()
        data.update(macro_iterations=1, output_dir=str(tmp_path / "runs"))
        data["length_control"]["enabled"] = False
        # the judge too runs on the servers, through the chat API, with the same key
        data["evaluation"]["judge"].update(enabled=True, model={"path": str(model_dir)}, engine={
            "backend": "openai", "endpoint": {"base_urls": urls, "api": "chat", "api_key_env": "SLKIT_TEST_KEY",
                                              "adapters": "none", "vllm_sampling": False, "max_retries": 0}})
        from slkit.core.params import dump_params, params_from_dict

        dump_params(params_from_dict(data), tmp_path / "endpoint.yaml")
        run_dir = run_loop(tmp_path / "endpoint.yaml", show_progress=False)
    finally:
        del os.environ["SLKIT_TEST_KEY"]
    records = [json.loads(line) for line in (run_dir / "iter_1" / "extensions.jsonl").read_text().splitlines()]
    metrics = json.loads((run_dir / "iter_1" / "evaluation.json").read_text())
    assert records and metrics["judge"]["judged"] + metrics["judge"]["failed"] == 8
    assert "SLKIT_TEST_KEY" in (run_dir / "params.yaml").read_text()  # the variable's name, not its value
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if secret.encode() in p.read_bytes()]


def test_a_server_killed_mid_stage_fails_it_once_and_the_rerun_completes_it(served_model, smoke_params, tmp_path,
                                                                           monkeypatch):
    """The only server dies while the evaluate stage's judge is asking it (the stage's benchmark outputs are
    written): the stage fails with one error naming the server, after the client's retries. With a server
    back on the same address the rerun judges every output once and keeps the benchmark outputs as written."""
    from slkit.core.params import dump_params, params_from_dict
    from slkit.core.records import read_jsonl

    model_dir, _ = served_model
    port = free_port()
    server, url = _start_server(model_dir, tmp_path / "server.log", port)
    data = _params(smoke_params, model_dir, base_urls=[url], concurrency=1, max_retries=1, timeout_s=10.0).to_dict()
    data["evaluation"]["max_new_tokens"] = 8
    data["evaluation"]["judge"].update(enabled=True, max_tries=1, max_new_tokens=16)  # on the run's engine
    run_dir = tmp_path / "run"
    out = iter_dir(run_dir, 1)
    out.mkdir(parents=True)
    dump_params(params_from_dict(data), run_dir / "params.yaml")

    # Requests per phase: the benchmark's in one generate call, the judge's submitted one at a time (its jobs).
    calls, killed = [], []
    real_generate, real_submit = EndpointEngine.generate, EndpointEngine.submit
    real_complete = EndpointEngine._complete

    def generate(self, requests, sampling, on_done=None):
        calls.append(("generate", len(requests)))
        return real_generate(self, requests, sampling, on_done)

    def submit(self, request, sampling):
        calls.append(("submit", 1))
        return real_submit(self, request, sampling)

    def complete(self, index, request, sampling, abandoned=None):
        text = real_complete(self, index, request, sampling, abandoned)
        if abandoned is not None and not killed:  # the judge's first reply is in: now the server dies
            server.kill()
            killed.append(server.wait())
        return text

    monkeypatch.setattr(EndpointEngine, "generate", generate)
    monkeypatch.setattr(EndpointEngine, "submit", submit)
    monkeypatch.setattr(EndpointEngine, "_complete", complete)
    with pytest.raises(RuntimeError, match=rf"every server failed for one request.*\n  {url}/?: APIConnectionError"):
        evaluation_stage(run_dir, 1)
    assert calls[0] == ("generate", 16) and {c for c in calls[1:]} == {("submit", 1)}
    assert not (out / "evaluation.done.json").exists()
    outputs = (out / "benchmark_outputs.jsonl").read_bytes()

    # A judged output's record is written when its job ends: the reply that came before the server died is kept.
    judged_before = len((out / "judgements.jsonl.partial").read_text().splitlines())
    assert judged_before >= 1
    calls.clear()
    server, _ = _start_server(model_dir, tmp_path / "server-again.log", port)
    try:
        metrics = evaluation_stage(run_dir, 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    # only the judge's requests of the outputs not judged yet: the benchmark outputs were not generated again
    assert calls == [("submit", 1)] * (8 - judged_before)
    assert (out / "benchmark_outputs.jsonl").read_bytes() == outputs
    assert sorted((r["index"], r["sample"]) for r in read_jsonl(out / "judgements.jsonl")) == [(i, 0) for i in range(8)]
    assert metrics["judge"]["judged"] + metrics["judge"]["failed"] == 8
    assert (out / "evaluation.done.json").exists()


def test_request_body_standard_and_vllm_fields():
    sampling = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1, min_new_tokens=5,
                              stop=["a", "b", "c", "d", "e"])
    body = request_body(Request("<bos>Q", "generator", 100, seed=7, prefill="P"), sampling, "m", "completions",
                        vllm_sampling=True, bos="<bos>")
    assert body["prompt"] == "QP" and body["max_tokens"] == 100 and body["seed"] == 7
    assert body["stop"] == ["a", "b", "c", "d"]  # the API's limit; the fifth is cut locally
    assert (body["top_k"], body["repetition_penalty"], body["min_tokens"]) == (20, 1.1, 5)
    plain = request_body(Request("Q", None, 10), sampling, "m", "completions", vllm_sampling=False)
    assert not {"top_k", "repetition_penalty", "min_tokens"} & set(plain)
    chat = request_body(Request("Q", None, 10, prefill="P"), sampling, "m", "chat", vllm_sampling=True)
    assert chat["messages"][-1] == {"role": "assistant", "content": "P"} and chat["continue_final_message"]
    greedy = request_body(Request("Q", None, 10), SamplingParams(temperature=0), "m", "completions", True)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)


def test_adapter_names_change_with_the_adapter_directory(tmp_path):
    assert adapter_name("generator", tmp_path / "iter_1") != adapter_name("generator", tmp_path / "iter_2")
    assert adapter_name("generator", tmp_path / "a").startswith("slkit-generator-")


def test_missing_key_variable_is_one_clear_error(smoke_params, tiny_model_path, monkeypatch):
    monkeypatch.delenv("SLKIT_NO_SUCH_KEY", raising=False)
    params = _params(smoke_params, tiny_model_path, api_key_env="SLKIT_NO_SUCH_KEY")
    with pytest.raises(ValueError, match="api_key_env: the environment variable SLKIT_NO_SUCH_KEY is not set"):
        EndpointEngine(params)


@pytest.fixture
def sent(monkeypatch):
    """The keyword arguments of every request the openai client sends (chat and completions)."""
    from openai.resources.chat.completions import Completions as Chat
    from openai.resources.completions import Completions

    calls = []
    for resource in (Chat, Completions):
        def create(self, *args, _real=resource.create, **kwargs):
            calls.append(kwargs)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(resource, "create", create)
    return calls


def test_the_judge_asks_a_server_for_the_json_schema_and_falls_back_where_it_is_refused(served_model, smoke_params,
                                                                                       tmp_path, sent):
    """transformers serve takes response_format on its chat API (and ignores it) and refuses it on completions
    (422): the judge's requests carry the schema; on the refusal the engine asks again without it, sends no schema
    from then on, and the judge's retries judge what the server answers."""
    from slkit.evaluation.judge import JUDGEMENT_SCHEMA, judge_responses
    from slkit.core.params import JudgeParams
    from slkit.core.records import RecordWriter

    model_dir, urls = served_model
    items = [{"index": i, "sample": 0, "query": f"q{i}", "output": f"text {i}"} for i in range(2)]
    for api in ("chat", "completions"):
        sent.clear()
        engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=urls[:1], api=api, concurrency=1))
        with RecordWriter(tmp_path / f"{api}.jsonl") as writer:
            judge_responses(engine, items, JudgeParams(enabled=True, max_tries=2, max_new_tokens=16), 0, writer)
            assert len(writer.finish()) == 2
        formats = [(call.get("extra_body") or {}).get("response_format") for call in sent]
        assert formats[0] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": JUDGEMENT_SCHEMA}}
        if api == "chat":
            assert all(f == formats[0] for f in formats) and engine.structured_outputs
        else:  # refused once, then never sent again
            assert formats[1:] and not any(formats[1:]) and not engine.structured_outputs


def test_a_servers_finish_reason_says_which_texts_the_cap_cut(served_model, smoke_params):
    model_dir, urls = served_model
    engine = EndpointEngine(_params(smoke_params, model_dir, base_urls=urls[:1]))
    [capped] = engine.generate([Request(engine.render("Tell a story."), None, 4)], GREEDY)
    assert capped.cut is True  # finish_reason "length": the tiny random model writes no end token in 4 tokens


def test_slkit_evaluate_scores_a_served_model_with_a_served_judge(served_model, tmp_path, sent):
    from slkit.evaluation.judge import JUDGEMENT_SCHEMA
    from slkit.running.cli import main
    from slkit.core.records import read_jsonl

    model_dir, urls = served_model
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_dir), "--endpoint", urls[0], "--judge-endpoint", urls[1],
                 "--recipe", str(Path(__file__).parent.parent / "params" / "smoke.yaml"),
                 "--benchmark", str(Path(__file__).parent / "fixtures" / "longen_mini.jsonl"),
                 "--subset", "4", "--samples", "1", "--max-new-tokens", "8", "--out", str(out), "--no-progress"]) == 0
    outputs, judged = read_jsonl(out / "benchmark_outputs.jsonl"), read_jsonl(out / "judgements.jsonl")
    assert len(outputs) == len(judged) == 4 and all(r["output"] for r in outputs)
    metrics = json.loads((out / "evaluation.json").read_text())
    assert (metrics["endpoint"], metrics["judge_endpoint"]) == (urls[0], urls[1])
    assert metrics["length_following"]["n"] == 4 and metrics["judge"]["judged"] + metrics["judge"]["failed"] == 4
    assert metrics["length_following"]["capped"] == {"outputs": 4, "cut": sum(r["cut"] for r in outputs),
                                                     "share": round(sum(r["cut"] for r in outputs) / 4, 4)}
    # the answers went to --endpoint through the chat API; the judge's to --judge-endpoint, with the schema
    answers = [c for c in sent if "messages" in c and "response_format" not in (c.get("extra_body") or {})]
    asked = [c for c in sent if (c.get("extra_body") or {}).get("response_format")]
    assert len(answers) == 4 and len(asked) >= 4
    assert all(c["extra_body"]["response_format"]["json_schema"]["schema"] == JUDGEMENT_SCHEMA for c in asked)
    assert {"report.md", "length_scores.png", "required_vs_produced.png"} <= {p.name for p in out.iterdir()}
