"""What of the vLLM engine runs without vLLM: request building and adapter bookkeeping (CPU).
The engine itself runs in tests/test_vllm_gpu.py on a GPU with vLLM installed."""
import pytest

from slkit.engines.base import Request
from slkit.core.params import SamplingParams, load_params
from slkit.engines.vllm import engine_kwargs, lora_ids, sampling_kwargs, supported_lora_rank

from conftest import REPO


def test_every_sampling_field_is_explicit():
    sampling = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1, min_new_tokens=64,
                              stop=["\n---\n", ""])
    kw = sampling_kwargs(sampling, Request("p", "generator", 4096, seed=11), [2, 7])
    assert kw["max_tokens"] == 4096  # never vLLM's default of 16
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["repetition_penalty"]) == (0.7, 0.8, 20, 1.1)
    assert (kw["min_tokens"], kw["seed"], kw["stop"], kw["stop_token_ids"]) == (64, 11, ["\n---\n"], [2, 7])
    assert kw["n"] == 1 and kw["ignore_eos"] is False and kw["skip_special_tokens"] is True
    # min_new_tokens above a request's own cap is cut to the cap (vLLM refuses min > max)
    assert sampling_kwargs(sampling, Request("p", None, 10), [])["min_tokens"] == 10
    greedy = sampling_kwargs(SamplingParams(temperature=0), Request("p", None, 5), [])
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, 0)


def test_one_lora_request_per_role_with_stable_ids(tmp_path):
    ids = lora_ids({"generator": str(tmp_path / "g"), "extender": None, "judge": str(tmp_path / "j")})
    assert ids == {"generator": ("generator", 1, str(tmp_path / "g")), "judge": ("judge", 2, str(tmp_path / "j"))}
    assert lora_ids(None) == {} and lora_ids({"generator": None}) == {}


@pytest.mark.parametrize("rank, served", [(1, 8), (8, 8), (16, 16), (17, 32), (64, 64), (300, 320)])
def test_lora_rank_rounds_up_to_one_vllm_serves(rank, served):
    assert supported_lora_rank(rank) == served


def test_lora_rank_beyond_vllm_is_named():
    with pytest.raises(ValueError, match="training.lora_r"):
        supported_lora_rank(1024)


def test_engine_kwargs_follow_the_recipe(tmp_path):
    params = load_params(REPO / "params" / "qwen2.5-7b-24gb.yaml",
                         {"model.path": str(tmp_path), "engine.vllm.max_model_len": 20000})
    kw = engine_kwargs(params, str(tmp_path))
    # the recipe's values (params/qwen2.5-7b-24gb.yaml), not vLLM's defaults
    assert (kw["model"], kw["tokenizer"], kw["dtype"], kw["seed"]) == (str(tmp_path), str(tmp_path), "bfloat16", 0)
    assert (kw["gpu_memory_utilization"], kw["max_loras"], kw["max_model_len"]) == (0.85, 2, 20000)
    assert kw["enable_lora"] and kw["quantization"] == "bitsandbytes" and kw["trust_remote_code"] is False
    # the served LoRA rank is the one the adapters are trained with, rounded up to one vLLM takes
    assert params.training.lora_r == 8 and kw["max_lora_rank"] == 8
    trained_at_17 = params.model_copy(update={"training": params.training.model_copy(update={"lora_r": 17})})
    assert engine_kwargs(trained_at_17, str(tmp_path))["max_lora_rank"] == 32
    served_at_64 = params.model_copy(update={"engine": params.engine.model_copy(update={
        "vllm": params.engine.vllm.model_copy(update={"max_lora_rank": 64})})})
    assert engine_kwargs(served_at_64, str(tmp_path))["max_lora_rank"] == 64
    bf16 = engine_kwargs(params.model_copy(update={"model": params.model.model_copy(update={"load_in_4bit": False})}),
                         str(tmp_path))
    assert "quantization" not in bf16
    assert "enable_lora" not in engine_kwargs(params, str(tmp_path), with_lora=False)  # iteration 1: no adapters


def _growth_params(tmp_path, **overrides):
    params = load_params(REPO / "params" / "growth-qwen2.5-1.5b.yaml",
                         {"output_dir": str(tmp_path), "model.path": str(tmp_path), **overrides})
    params.run_dir.mkdir(parents=True, exist_ok=True)
    return params


def test_the_engine_logs_its_start_and_decoding_time_to_the_run(tmp_path, fake_vllm):
    """runs/<run>/engine_timings.jsonl: one line when the engine is ready (start seconds), one when it closes
    (decoding seconds, requests, tokens), so a run shows how much of it engine starts take (issue 14)."""
    import json

    from slkit.engines.vllm import VLLMEngine

    params = _growth_params(tmp_path)
    engine = VLLMEngine(params, {})
    engine.generate([Request("p", None, 8, seed=i) for i in range(3)], params.sampling)
    engine.close()
    lines = [json.loads(line) for line in (params.run_dir / "engine_timings.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["ready", "closed"]
    assert lines[0]["start_s"] >= 0 and lines[1]["requests"] == 3 and lines[1]["generated_tokens"] == 120
    assert lines[1]["generate_s"] >= 0
