from pathlib import Path

import pytest

from slkit.core.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    params = load_params(path)
    assert params.run_name
    assert params.model.trust_remote_code is False  # no recipe runs remote code by default


def test_defaults_are_the_reference_values(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("run_name: x\nmodel:\n  path: builtin:tiny-random-llama\n")
    p = load_params(f)
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k, p.sampling.repetition_penalty) == (0.7, 0.8, 20, 1.1)
    assert p.sampling.max_new_tokens == 16384 and p.training.max_length == 16384
    # the reference's stop strings (its chat-turn end tokens are stop token ids here)
    assert p.sampling.stop == ["\n\n---", "\n\n\n", "\n---", "---"]
    # 5,000 queries in each language (the reference runs one language per run)
    assert (p.queries.per_language, p.queries.examples_per_prompt, p.queries.max_tries) == (5000, 2, 10)
    assert (p.queries.min_words, p.queries.max_words) == (3, 500)
    assert (p.drafts.samples_per_query, p.drafts.max_tries, p.drafts.resample) == (2, 20, True)
    assert (p.extensions.micro_iterations, p.extensions.min_ratio, p.extensions.max_tries) == (3, 1.2, 20)
    assert p.extensions.samples_per_draft == 2
    assert p.extensions.keep_fraction == pytest.approx(2 / 3)
    assert (p.resampling.enabled, p.resampling.coefficient, p.resampling.exponent) == (True, 2.0, 3.0)
    assert p.training.line_keep_prob == 0.8
    # LoRA on all linear layers with LLaMA-Factory's defaults of the time
    assert (p.training.lora_r, p.training.lora_alpha, p.training.lora_dropout, p.training.target_modules) == (
        8, 16, 0.0, "all-linear")
    assert (p.training.learning_rate, p.training.epochs, p.training.lr_scheduler, p.training.warmup_ratio) == (1e-4, 4.0, "cosine", 0.1)
    assert (p.training.batch_size, p.training.gradient_accumulation, p.model.dtype) == (1, 8, "bfloat16")
    assert (p.quality.ngram_zh, p.quality.ngram_en) == (13, 10)
    assert (p.quality.meta_head_lines, p.quality.meta_tail_lines) == (2, 3)
    lc = p.length_control
    assert (lc.min_words, lc.max_words, lc.round_to, lc.coarse_prob) == (2000, 8000, 1000, 0.2)
    assert lc.proportions == {"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}
    assert p.evaluation.subset_size is None  # the whole benchmark
    assert p.macro_iterations == 3
    assert (p.length_control.min_words, p.length_control.max_words, p.length_control.round_to) == (2000, 8000, 1000)
    assert p.length_control.collect_queries == 5000  # the reference's collection pass


def _write(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return f


@pytest.mark.parametrize("text,error", [
    ("run_name: x\nmodel:\n  path: builtin:tiny-random-llama\ntraining:\n  lora_rank: 8\n",
     r"bad.yaml:5: training.lora_rank: unknown key"),
    ("run_name: x\nmodel:\n  path: builtin:tiny-random-llama\nsampling:\n  top_k: twenty\n",
     r"bad.yaml:5: sampling.top_k: .*integer.*'twenty'"),
    ("run_name: x\n", r"model: missing required key"),
    ("run_name: x\nmodel:\n  path: ./no/such/model\n",
     r"bad.yaml:3: model.path: .*neither an existing model directory nor a hub id"),
    ("model:\n  path: builtin:tiny-random-llama\nrun_name: ../../escape\n",
     r"bad.yaml:3: run_name: .*one directory name .*a path belongs in output_dir.*'../../escape'"),
    ("run_name: runs/x\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*'runs/x'"),
    ("run_name: ..\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*'..'"),
    ("run_name: a..b\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*'a..b'"),
    ("run_name: '.'\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*'.'"),
    ("run_name: 'my run'\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*'my run'"),
    ("run_name: ''\nmodel:\n  path: builtin:tiny-random-llama\n", r"bad.yaml:1: run_name: .*''"),
], ids=["unknown key", "wrong type", "missing model", "model directory that does not exist", "run_name climbing out",
        "run_name with a separator", "run_name ..", "run_name with ..", "run_name .", "run_name with a space",
        "empty run_name"])
def test_error_names_key_file_and_line(tmp_path, text, error):
    with pytest.raises(ParamsError, match=error):
        load_params(_write(tmp_path, text))


def test_run_name_is_one_directory_name(tmp_path):
    for name in ("qwen2.5-7b_try.2", "smoke", "实验1", ".hidden"):
        assert load_params(_write(tmp_path, f"run_name: '{name}'\nmodel:\n  path: builtin:tiny-random-llama\n")).run_name == name


def test_hub_id_and_unknown_builtin(tmp_path):
    assert load_params(_write(tmp_path, "run_name: x\nmodel:\n  path: Qwen/Qwen2.5-7B-Instruct\n")).model.path
    with pytest.raises(ParamsError, match="unknown builtin model"):
        load_params(_write(tmp_path, "run_name: x\nmodel:\n  path: builtin:gpt-5\n"))


def test_malformed_yaml_names_line(tmp_path):
    f = _write(tmp_path, "run_name: x\nmodel:\n  path: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad.yaml:\d+: malformed YAML"):
        load_params(f)


def test_scientific_notation_is_a_float(tmp_path):
    f = _write(tmp_path, "run_name: x\nmodel:\n  path: builtin:tiny-random-llama\ntraining:\n  learning_rate: 2e-4\n")
    assert load_params(f).training.learning_rate == 2e-4


def test_overrides(tmp_path):
    f = _write(tmp_path, "run_name: x\nmodel:\n  path: builtin:tiny-random-llama\n")
    p = load_params(f, {"training.epochs": 2.0, "macro_iterations": 1})
    assert p.training.epochs == 2.0 and p.macro_iterations == 1
