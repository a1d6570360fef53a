"""Every number of the method (docs/method.md, up to its table of departures) is a setting that `slkit check`
prints for a minimal recipe, with the method's value; or it is listed below as not a setting, with the reason.

A number added to docs/method.md fails this test until it is mapped to its key or listed as not a setting."""
import re

import pytest
import yaml

from conftest import REPO
from slkit.running.cli import main
from slkit.running.explain import all_settings

METHOD = REPO / "docs" / "method.md"
DEPARTURES = "## Where slkit departs from the reference"  # slkit's own values: the numbers above are the method's

# (words of docs/method.md that hold a setting, {dotted key of `slkit check` output: the method's value})
SETTINGS = [
    ("(repeated, 3 by default)", {"macro_iterations": 3}),
    ("show the model 2 instructions", {"queries.examples_per_prompt": 2}),
    ("it is 3-500 words long", {"queries.min_words": 3, "queries.max_words": 500}),
    ("Up to 10 tries per query", {"queries.max_tries": 10}),
    ("Reference: 5,000 queries per iteration", {"queries.per_language": 5000}),
    ("queries, 5,000 by default, answered by the final Generator", {"length_control.collect_queries": 5000}),
    ("2 samples per query, each with up to 20 tries", {"drafts.samples_per_query": 2, "drafts.max_tries": 20}),
    ("applies the length-biased resampling of step 3 to the drafts too", {"drafts.resample": True}),
    ("up to 3 micro-iterations per draft", {"extensions.micro_iterations": 3}),
    ("keep only the first n*2//3", {"extensions.keep_fraction": 2 / 3}),
    ("words(best) > 1.2 x words(draft)", {"extensions.min_ratio": 1.2}),
    ("the whole extension, up to 20 tries", {"extensions.max_tries": 20}),
    ("TWO independent extension jobs per draft (each with its own 20 tries)",
     {"extensions.samples_per_draft": 2, "extensions.max_tries": 20}),
    (r"c = 2,\ e = 3", {"resampling.coefficient": 2.0, "resampling.exponent": 3.0}),
    ("keep an item if U(0,1) > 2 r^3", {"resampling.enabled": True, "resampling.coefficient": 2.0,
                                        "resampling.exponent": 3.0}),
    ("each line kept with p=0.8", {"training.line_keep_prob": 0.8}),
    ("LoRA on all linear layers", {"training.target_modules": "all-linear"}),
    ("rank 8, alpha 16, dropout 0;", {"training.lora_r": 8, "training.lora_alpha": 16, "training.lora_dropout": 0.0}),
    ("lr 1e-4, 4 epochs, cosine schedule, warmup 0.1, batch 1,",
     {"training.learning_rate": 1e-4, "training.epochs": 4.0, "training.lr_scheduler": "cosine",
      "training.warmup_ratio": 0.1, "training.batch_size": 1}),
    ("samples cut at 16,384 tokens, bf16", {"training.max_length": 16384, "model.dtype": "bfloat16"}),
    ("continues from the previous iteration's adapters", {"training.continue_adapters": True}),
    ("n=13", {"quality.ngram_zh": 13}),
    ("n=10", {"quality.ngram_en": 10}),
    ("in the first 2 or last 3 lines", {"quality.meta_head_lines": 2, "quality.meta_tail_lines": 3}),
    ("temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1, max 16,384 new tokens",
     {"sampling.temperature": 0.7, "sampling.top_p": 0.8, "sampling.top_k": 20, "sampling.repetition_penalty": 1.1,
      "sampling.max_new_tokens": 16384}),
    ('stop strings such as a line of "---" or three newlines', {"sampling.stop": ["\n\n---", "\n\n\n", "\n---", "---"]}),
    ("pairs with 2,000-8,000 words", {"length_control.min_words": 2000, "length_control.max_words": 8000}),
    ('of 4 kinds drawn 40% "about N words", 25% "between A and B words", 10% "more than A words", 25% "less than B words"',
     {"length_control.proportions": {"about": 0.40, "range": 0.25, "above": 0.10, "below": 0.25}}),
    ("nearest 1,000, with probability 0.2 to 2,000", {"length_control.round_to": 1000, "length_control.coarse_prob": 0.2}),
    ("clamped to [2,000, 8,000]", {"length_control.min_words": 2000, "length_control.max_words": 8000}),
]

# Numbers of docs/method.md that are not settings, found by pattern, and why.
NOT_SETTINGS = [
    (r"arXiv 2410\.23933", "the paper's id"),
    (r"~1,000 words at most|from ~1,000 to ~8,000 words|Qwen2-7B-Instruct|GPT-4o", "the paper's claims and models"),
    (r"### \d\.", "the numbering of the method's steps"),
    (r"Llama 3\.1|Qwen2 runs", "the reference's two script sets"),
    (r"\\lfloor n/2 \\rfloor|\\lfloor 2m/3 \\rfloor|r\^3 > 1/2", "the former part's and kept head's formulas"),
    (r"Instruction \d", "the labels of the self-instruct prompt (slkit/method/prompts.py)"),
    (r"step \d|[Pp]hase[- ][12]|phase2_\w+", "names of steps and phases"),
    (r"\$r = 1 - \\text\{rank\}/N\$ \(\$r\$ near 1 for the shortest\)|U\(0,1\) > c \\cdot r\^\{e\}",
     "the resampling formula (tests/test_training_sets.py)"),
    (r"\(reference: 10 per language;", "the exemplar pool is data (slkit/core/exemplars), not a setting"),
    (r"over 2,000 words", "part of the judge prompt's question (slkit/method/prompts.py)"),
    (r"gives at most 2 pieces", "the former part's rule (slkit/method/extensions.former_part)"),
    (r"r = 1 - rank/N|r near 1 for the shortest|About 60% survive; the shortest ~20% always go",
     "the resampling formula and its consequences (tests/test_training_sets.py)"),
    (r"~20% of its lines", "the complement of training.line_keep_prob"),
    (r"U\+[0-9A-F]{4}-[0-9A-F]{4}|13-14% more words", "the word counter's character classes and a measured fact"),
    (r"240 queries.*?x 10\)", "LonGen's size and shape; evaluation.subset_size: null scores all of it"),
    (r"\[0\.8T, 1\.2T\]|\[T, 1\.5T\]|\[0\.5T, T\]|1 inside; max\(2L/a - 1, 0\) below; max\(3 - 2L/b, 0\)",
     "LonGen's scoring rule (slkit/evaluation/benchmarks.py, tests/test_evaluation.py)"),
    (r"120 prompts.*?100 to 20,000|S_l = 100 \* max\(0, 1 - \(y/x - 1\)/3\) if y > x else 100 \* max\(0, 1 - \(x/y - 1\)/2\)",
     "LongBench-Write's size and scoring rule (slkit/evaluation/benchmarks.py)"),
    (r"scores each response 1-10", "the judge's scale (slkit/evaluation/judge.py)"),
]

NUMBER = re.compile(r"\d")


@pytest.fixture(scope="module")
def method_text():
    return " ".join(METHOD.read_text(encoding="utf-8").split(DEPARTURES)[0].split())  # one line: phrases wrap


@pytest.fixture
def minimal_recipe(tmp_path):
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text("run_name: minimal\nmodel:\n  path: builtin:tiny-random-llama\n")
    return recipe


def _lookup(tree, key):
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_every_number_of_the_method_is_a_setting_or_said_not_to_be(method_text):
    rest = method_text
    for phrase, _ in SETTINGS:
        assert phrase in method_text, f"docs/method.md no longer says {phrase!r}: update SETTINGS"
        rest = rest.replace(phrase, " ")
    for pattern, _ in NOT_SETTINGS:
        assert re.search(pattern, method_text), f"docs/method.md no longer matches {pattern!r}: update NOT_SETTINGS"
        rest = re.sub(pattern, " ", rest)
    unaccounted = [rest[max(0, m.start() - 40):m.end() + 40] for m in NUMBER.finditer(rest)]
    assert not unaccounted, "numbers of docs/method.md with no setting here:\n" + "\n".join(unaccounted)


def test_slkit_check_prints_each_with_the_methods_value(minimal_recipe, capsys):
    assert main(["check", str(minimal_recipe)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for phrase, values in SETTINGS:
        for key, value in values.items():
            got = _lookup(printed, key)
            assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{key} ({phrase!r}): {got!r}"


def test_each_setting_carries_the_methods_value_as_its_reference():
    """The reference value beside each field (`slkit check --explain`, docs/params.md) is the method's number."""
    references = {s.key: s.reference for s in all_settings()}
    for phrase, values in SETTINGS:
        for key, value in values.items():
            got = references[key]
            assert got == (pytest.approx(value) if isinstance(value, float) else value), f"{key} ({phrase!r}): {got!r}"
