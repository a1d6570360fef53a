import pytest
import torch

from slkit.engines.base import Request, cut_at_stop, trim_unfinished
from slkit.engines.transformers import TransformersEngine


def test_stop_strings_and_trimming():
    assert cut_at_stop("para one.\n\n\n\nnext doc", ["\n\n\n"]) == "para one."
    assert cut_at_stop("a\n---\nb", ["\n---\n", "zzz"]) == "a"
    assert trim_unfinished("First sentence. Second one is cut") == "First sentence."
    assert trim_unfinished("他来了。然后他") == "他来了。"
    # a capped list or outline leaves the next item's number or heading mark: it goes too
    assert trim_unfinished("Intro.\n\n1. **Soil**: keep it moist.\n\n2.") == "Intro.\n\n1. **Soil**: keep it moist."
    assert trim_unfinished("第一点。\n\n3. **") == "第一点。" and trim_unfinished("End.\n\n### ") == "End."
    assert trim_unfinished("Version 2.0 is out.\nIt works.") == "Version 2.0 is out.\nIt works."
    assert trim_unfinished('She said "go." and then') == 'She said "go."'
    assert trim_unfinished("no end at all") == "no end at all"


@pytest.fixture(scope="module")
def engine(smoke_params, tiny_model_path):
    params = smoke_params.model_copy(update={"engine": smoke_params.engine.model_copy(update={"batch_size": 4})})
    return TransformersEngine(params)


def test_batched_left_padded_generation_matches_one_by_one(engine, smoke_params):
    greedy = smoke_params.sampling.model_copy(update={"temperature": 0.0, "stop": [], "repetition_penalty": 3.0})
    prompts = ["Write a long essay on tea.", "Hi", "请写一篇关于城市河流的长文，介绍它的历史。", "Tell me more."]
    requests = [Request(engine.render(p), None, 12) for p in prompts]
    batched = engine.generate(requests, greedy)
    single = [engine.generate([r], greedy)[0] for r in requests]
    assert batched == single
    assert any(batched)


def test_stop_early_ends_its_row_only_and_the_others_are_sampled_as_without_it(engine, smoke_params):
    sampling = smoke_params.sampling.model_copy(update={"stop": [], "trim_unfinished": False})
    plain = [Request(engine.render(p), None, 80, seed=3) for p in ("Write about tea.", "Write about rivers.")]
    checked = []

    def after_40_chars(text):
        checked.append(len(text))
        return len(text) > 40

    watched = [plain[0], Request(plain[1].prompt, None, 80, seed=3, stop_early=after_40_chars)]
    before, after = engine.generate(plain, sampling), engine.generate(watched, sampling)
    assert after[0] == before[0] and not after[0].stopped_early
    assert after[1].stopped_early and not after[1].cut
    assert len(after[1]) < len(before[1]) and before[1].startswith(after[1][:20])
    assert checked and all(n > 0 for n in checked)  # checked every 32 tokens, on the text so far


def test_sampling_is_reproducible_by_seed(engine, smoke_params):
    r = [Request(engine.render("Write."), None, 16, seed=7)]
    assert engine.generate(r, smoke_params.sampling) == engine.generate(r, smoke_params.sampling)


def test_role_adapter_is_used_and_base_when_role_has_none(smoke_params, tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from slkit.models.loading import load_model

    model = get_peft_model(load_model(smoke_params.model), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # a LoRA that changes the output
    model.save_pretrained(tmp_path / "gen")
    engine = TransformersEngine(smoke_params, {"generator": str(tmp_path / "gen"), "extender": None})
    greedy = smoke_params.sampling.model_copy(update={"temperature": 0.0, "stop": [], "repetition_penalty": 3.0})
    prompt = engine.render("Write a long story.")
    with_adapter = engine.generate([Request(prompt, "generator", 12)], greedy)[0]
    base_engine = TransformersEngine(smoke_params)
    base = base_engine.generate([Request(prompt, None, 12)], greedy)[0]
    # the extender has no adapter yet (iteration 1): it must be the base model
    assert engine.generate([Request(prompt, "extender", 12)], greedy)[0] == base
    assert with_adapter != base


@pytest.mark.parametrize("avx512_bf16, amx, device, expected", [
    (False, False, "cpu", "float32"), (True, False, "cpu", "bfloat16"), (False, True, "cpu", "bfloat16"),
    (False, False, "cuda:0", "bfloat16")])
def test_auto_dtype_is_bf16_only_where_bf16_is_fast(monkeypatch, avx512_bf16, amx, device, expected):
    from slkit.models.loading import compute_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert compute_dtype("auto", device) == expected
    assert compute_dtype("float16", device) == "float16"  # an explicit dtype is kept


def test_cpu_int8_engine_quantises_base_layers_keeps_lora_and_skipped_layers_and_stays_close(
        smoke_params, tiny_model_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    from slkit.models.loading import load_model

    model = get_peft_model(load_model(smoke_params.model), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "gen")
    engine_params = smoke_params.engine.model_copy(update={"cpu_int8": True, "device": "cpu"})
    params = smoke_params.model_copy(update={"engine": engine_params})
    float_engine = TransformersEngine(smoke_params.model_copy(update={"model": smoke_params.model.model_copy(
        update={"dtype": "float32"})}), {"generator": str(tmp_path / "gen")})
    int8_engine = TransformersEngine(params, {"generator": str(tmp_path / "gen")})

    layers = dict(int8_engine.model.named_modules())
    quantised = [n for n, m in layers.items() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert sorted(quantised) == sorted(int8_engine.int8_layers) and quantised
    assert all(n.endswith(".base_layer") or n.endswith("lm_head") for n in quantised)
    # LoRA layers and the skipped down_proj stay float32 nn.Linear
    assert not any(".lora_" in n or "down_proj" in n for n in quantised)
    assert all(type(m) is torch.nn.Linear for n, m in layers.items() if n.endswith("down_proj.base_layer"))
    assert all(type(m) is torch.nn.Linear for n, m in layers.items() if ".lora_A." in n or ".lora_B." in n)

    enc = float_engine._encode([float_engine.render("Write a long story about rivers.")])
    with torch.inference_mode():
        for role in ("generator", None):
            with float_engine._adapter(role), int8_engine._adapter(role):
                ref = float_engine.model(**enc).logits[0, -1].log_softmax(-1)
                got = int8_engine.model(**enc).logits[0, -1].log_softmax(-1)
            assert got.argmax() == ref.argmax()
            assert (ref.exp() * (ref - got)).sum() < 0.05  # KL in nats
        with int8_engine._adapter("generator"):
            adapted = int8_engine.model(**enc).logits[0, -1]
        with int8_engine._adapter(None):
            base = int8_engine.model(**enc).logits[0, -1]
    assert not torch.allclose(adapted, base)  # the adapter still acts on the int8 model
    greedy = smoke_params.sampling.model_copy(update={"temperature": 0.0, "stop": [], "repetition_penalty": 3.0})
    prompt = int8_engine.render("Write a long story.")
    assert int8_engine.generate([Request(prompt, "generator", 8)], greedy)[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.8), (1.0, 5, 1.0), (0.5, 50, 0.3)])
def test_top_k_sampler_draws_from_the_distribution_of_transformers_warpers(temperature, top_k, top_p):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from slkit.engines.transformers import TopKSampler, top_k_top_p_probs

    torch.manual_seed(0)
    scores = torch.randn(4, 300) * 3
    scores[0, :150] = float("-inf")  # a row with forbidden tokens (min_new_tokens masks eos like this)
    warped = scores
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)):
        warped = warper(None, warped)
    expected = warped.softmax(-1)
    probs, ids = top_k_top_p_probs(scores, temperature, top_k, top_p)
    got = torch.zeros_like(expected).scatter_(-1, ids, probs)
    assert torch.allclose(got, expected, atol=1e-6)

    chosen = TopKSampler(temperature, top_k, top_p)(None, scores)
    assert ((chosen == 0).sum(-1) == 1).all() and torch.isinf(chosen).sum(-1).eq(299).all()
    assert (expected.gather(-1, chosen.argmax(-1, keepdim=True)) > 0).all()  # drawn from the support
    # frequencies over many draws follow the distribution
    draws = torch.stack([TopKSampler(temperature, top_k, top_p)(None, scores[1:2]).argmax(-1) for _ in range(3000)])
    freq = torch.bincount(draws.flatten(), minlength=300).float() / 3000
    assert (freq - expected[1]).abs().max() < 0.04
