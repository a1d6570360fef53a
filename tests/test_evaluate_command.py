"""`slkit evaluate`: any model scored on a benchmark without a run, by the evaluation stage's own code, into
the stage's files plus report.md. (Against a real OpenAI-compatible server: tests/test_endpoint_engine.py.)"""
import json

import pytest

from conftest import REPO
from slkit.running.cli import main
from slkit.core.layout import BASELINE, iter_dir
from slkit.running.pipeline import prepare_run
from slkit.core.records import read_jsonl
from slkit.stages.evaluation import evaluation_stage

BENCHMARK = REPO / "tests" / "fixtures" / "longen_mini.jsonl"
SETTINGS = ["--subset", "4", "--samples", "2", "--max-new-tokens", "12"]


def test_evaluate_scores_the_builtin_model_as_the_stage_does(tmp_path, tiny_model_path):
    """The untrained tiny model scored by the baseline evaluation stage and by `slkit evaluate` with the same
    recipe: the same outputs and judgements, the stage's metrics and benchmark figures, and a report."""
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {
        "output_dir": str(tmp_path / "runs"), "evaluation.benchmark": str(BENCHMARK), "evaluation.subset_size": 4,
        "evaluation.samples_per_query": 2, "evaluation.max_new_tokens": 12})
    evaluation_stage(run_dir, BASELINE)
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "builtin:tiny-random-llama", "--recipe", str(REPO / "params" / "smoke.yaml"),
                 "--benchmark", str(BENCHMARK), "--out", str(out), "--no-progress", *SETTINGS]) == 0
    baseline = iter_dir(run_dir, BASELINE)
    for name in ("benchmark_outputs.jsonl", "judgements.jsonl"):
        assert read_jsonl(out / name) == read_jsonl(baseline / name), name
    metrics = json.loads((out / "evaluation.json").read_text())
    stage = json.loads((baseline / "evaluation.json").read_text())
    assert metrics["length_following"] == stage["length_following"] and metrics["judge"] == stage["judge"]
    capped = metrics["length_following"]["capped"]
    assert capped["outputs"] == 8 and capped["cut"] == sum(r["cut"] for r in read_jsonl(out / "benchmark_outputs.jsonl"))
    assert capped["cut"] > 0  # 12 tokens of a random model: the cap ends them
    figures = {"required_vs_produced.png", "length_scores.png", "length_stability.png", "distinct_n.png"}
    assert set(metrics["figures"]) == figures and figures <= set(stage["figures"])
    assert all((out / name).stat().st_size > 0 for name in figures)
    report = (out / "report.md").read_text()
    assert "# Evaluation of builtin:tiny-random-llama" in report and "Cut by max_new_tokens" in report
    assert f"**{metrics['length_following']['overall']:.4g}**" in report


def test_evaluate_loads_an_adapter_and_refuses_other_params_in_the_same_directory(tmp_path, tiny_model_path, capsys):
    from slkit.core.params import load_params
    from slkit.training.adapters import train_adapter

    # an adapter the way training writes one: two steps on two examples
    examples = tmp_path / "sft.jsonl"
    examples.write_text("".join(json.dumps({"id": str(i), "prompt": f"Write {i}.", "completion": "Words " * 20}) + "\n"
                                for i in range(2)))
    adapter = tmp_path / "adapter"
    train_adapter(load_params(REPO / "params" / "smoke.yaml"), examples, adapter)
    out = tmp_path / "eval"
    common = ["evaluate", "--model", "builtin:tiny-random-llama", "--recipe", str(REPO / "params" / "smoke.yaml"),
              "--benchmark", str(BENCHMARK), "--out", str(out), "--no-progress", "--no-judge", "--subset", "2",
              "--max-new-tokens", "8"]
    assert main([*common, "--adapter", str(adapter)]) == 0
    metrics = json.loads((out / "evaluation.json").read_text())
    assert metrics["adapter"] == str(adapter.resolve()) and metrics["judge"] is None
    assert not (out / "judgements.jsonl").exists()
    assert main([*common, "--adapter", str(adapter), "--set", "seed=7"]) == 2
    assert "other params (seed differ)" in capsys.readouterr().err
    assert main([*common, "--adapter", str(tmp_path)]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err


def test_an_unknown_benchmark_is_one_clear_error(tmp_path, capsys):
    assert main(["evaluate", "--model", "builtin:tiny-random-llama", "--benchmark", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "--benchmark:" in capsys.readouterr().err and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flags", [["--adapter", "a", "--endpoint", "http://x/v1"]])
def test_an_adapter_and_an_endpoint_exclude_each_other(flags, tmp_path):
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", "m/m", "--out", str(tmp_path), *flags])
