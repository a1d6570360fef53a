"""Bad input stops `slkit run` with one clear error before any model is loaded (issue: nothing lost)."""
import subprocess
import sys

import pytest

from conftest import REPO, slkit_message
from slkit.core.params import ParamsError, load_params
from slkit.running.pipeline import prepare_run
from slkit.core.records import RecordFileError
from slkit.core.layout import lock_path
from slkit.stages.training import training_stage

SMOKE = REPO / "params" / "smoke.yaml"


def _prepare(tmp_path, **overrides):
    return prepare_run(SMOKE, {"output_dir": str(tmp_path / "runs"), **overrides})


def test_seed_file_with_a_broken_line(tmp_path):
    exemplars = tmp_path / "exemplars.jsonl"
    exemplars.write_text('{"query": "Write a long history of tea."}\n{"query": "Write about rivers.",\n')
    with pytest.raises(RecordFileError, match=r"exemplars.jsonl:2: not valid JSON"):
        _prepare(tmp_path, **{"queries.exemplar_files": [str(exemplars)]})
    assert not (tmp_path / "runs").exists()  # nothing written


def test_seed_record_without_query(tmp_path):
    exemplars = tmp_path / "exemplars.jsonl"
    exemplars.write_text('{"prompt": "Write a long history of tea."}\n')
    with pytest.raises(RecordFileError, match=r"exemplars.jsonl:1: missing field\(s\) query"):
        _prepare(tmp_path, **{"queries.exemplar_files": [str(exemplars)]})


def test_empty_exemplar_pool(tmp_path):
    exemplars = tmp_path / "exemplars.jsonl"
    exemplars.write_text("\n")
    with pytest.raises(RecordFileError, match="the exemplar pool is empty"):
        _prepare(tmp_path, **{"queries.exemplar_files": [str(exemplars)]})


def test_missing_seed_file(tmp_path):
    with pytest.raises(ParamsError, match=r"queries.exemplar_files.0: file .*nope.jsonl does not exist"):
        _prepare(tmp_path, **{"queries.exemplar_files": [str(tmp_path / "nope.jsonl")]})


def test_benchmark_with_a_broken_line(tmp_path):
    bench = tmp_path / "bench.jsonl"
    bench.write_text((REPO / "tests" / "fixtures" / "longen_mini.jsonl").read_text() + '{"language": "en"}\n')
    with pytest.raises(RecordFileError, match=r"bench.jsonl:9: missing field\(s\) range, type, constraint, query"):
        _prepare(tmp_path, **{"evaluation.benchmark": str(bench)})


def test_model_directory_that_is_not_a_model(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(ParamsError, match=r"model.path: .* has no config.json"):
        _prepare(tmp_path, **{"model.path": str(empty)})


def test_output_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ParamsError, match=r"output_dir: cannot write"):
        prepare_run(SMOKE, {"output_dir": str(blocker / "runs")})


def test_resume_with_resource_keys_is_allowed_and_logged(tmp_path):
    _prepare(tmp_path)
    params, run_dir = _prepare(tmp_path, **{"engine.batch_size": 2, "training.max_length": 128})
    assert params.engine.batch_size == 2
    assert "engine.batch_size, training.max_length" in (run_dir / "params_changes.log").read_text()
    with pytest.raises(ParamsError, match=r"seed differ"):
        _prepare(tmp_path, seed=5)


def test_resume_of_a_run_started_before_a_key_existed(tmp_path):
    """A run directory written by an older slkit lacks the keys added since: they count as their defaults
    (what the older slkit did), so the run resumes; a recipe that sets one otherwise is still refused."""
    import yaml

    _, run_dir = _prepare(tmp_path)
    snapshot = run_dir / "params.yaml"
    older = yaml.safe_load(snapshot.read_text())
    del older["engine"]["cpu_int8"], older["engine"]["cpu_int8_skip"]
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    _prepare(tmp_path)
    assert not (run_dir / "params_changes.log").exists()
    assert yaml.safe_load(snapshot.read_text())["engine"]["cpu_int8"] is False  # the snapshot is whole again
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.raises(ParamsError, match=r"\(engine.cpu_int8 differ\)"):
        _prepare(tmp_path, **{"engine.cpu_int8": True})


def test_resume_of_a_run_started_while_a_removed_key_existed(tmp_path):
    """engine.vllm.enable_sleep_mode went (the length-control stage runs each vLLM engine in a child process);
    run directories written while it existed hold it at false, the growth run's among them: they resume. A
    recipe that turns it on is told why it went, at its line."""
    import yaml

    _, run_dir = _prepare(tmp_path)
    snapshot = run_dir / "params.yaml"
    older = yaml.safe_load(snapshot.read_text())
    older["engine"]["vllm"]["enable_sleep_mode"] = False
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    _prepare(tmp_path)
    assert not (run_dir / "params_changes.log").exists()
    assert "enable_sleep_mode" not in yaml.safe_load(snapshot.read_text())["engine"]["vllm"]
    older["engine"]["vllm"]["enable_sleep_mode"] = True
    recipe = tmp_path / "sleep.yaml"
    recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    line = recipe.read_text().splitlines().index("    enable_sleep_mode: true") + 1
    with pytest.raises(ParamsError, match=rf"sleep.yaml:{line}: engine.vllm.enable_sleep_mode: no longer a setting "
                                          r"\(the length-control stage runs each vLLM engine in a child process"):
        load_params(recipe)


def test_the_retired_loss_keys_are_read_away_at_any_value(tmp_path):
    """training.loss and loss_chunk_tokens went with slkit's own trainer (TRL's computes the loss): every value
    computed the same loss, so a run directory holding any of them resumes, and a recipe with them loads."""
    import yaml

    _, run_dir = _prepare(tmp_path)
    snapshot = run_dir / "params.yaml"
    older = yaml.safe_load(snapshot.read_text())
    older["training"].update(loss="liger", loss_chunk_tokens=256)
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    _prepare(tmp_path)
    assert not (run_dir / "params_changes.log").exists()
    assert not {"loss", "loss_chunk_tokens"} & set(yaml.safe_load(snapshot.read_text())["training"])
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    assert "loss" not in load_params(recipe).to_dict()["training"]


def test_a_renamed_key_still_loads_under_its_new_name(tmp_path):
    """extensions.stage1/stage2_max_new_tokens are now phase1/phase2_max_new_tokens (slkit.core.params.RENAMED_KEYS):
    a recipe, a --set or a run directory's params.yaml that says the old name loads as the new one, with a warning
    naming the file and both keys; the run resumes and its snapshot is written under the new name."""
    import yaml

    _, run_dir = _prepare(tmp_path, **{"extensions.phase1_max_new_tokens": 64})
    snapshot = run_dir / "params.yaml"
    older = yaml.safe_load(snapshot.read_text())
    older["extensions"]["stage1_max_new_tokens"] = older["extensions"].pop("phase1_max_new_tokens")
    older["extensions"]["stage2_max_new_tokens"] = older["extensions"].pop("phase2_max_new_tokens")
    snapshot.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.warns(FutureWarning, match=rf"{snapshot}: extensions.stage1_max_new_tokens is now called "
                                           r"extensions.phase1_max_new_tokens"):
        _prepare(tmp_path, **{"extensions.phase1_max_new_tokens": 64})
    assert not (run_dir / "params_changes.log").exists()  # the same params: nothing changed
    saved = yaml.safe_load(snapshot.read_text())["extensions"]
    assert saved["phase1_max_new_tokens"] == 64 and "stage1_max_new_tokens" not in saved

    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    with pytest.warns(FutureWarning, match=r"old.yaml: extensions.stage1_max_new_tokens is now called "
                                           r"extensions.phase1_max_new_tokens"):
        assert load_params(recipe).extensions.phase1_max_new_tokens == 64
    with pytest.warns(FutureWarning, match=r"--set: extensions.stage2_max_new_tokens is now called "
                                           r"extensions.phase2_max_new_tokens"):
        params = load_params(recipe, {"extensions.stage2_max_new_tokens": 32})
    assert (params.extensions.phase1_max_new_tokens, params.extensions.phase2_max_new_tokens) == (64, 32)
    older["extensions"]["phase1_max_new_tokens"] = 128  # both names of one key
    recipe.write_text(yaml.safe_dump(older, sort_keys=False))
    line = recipe.read_text().splitlines().index("  stage1_max_new_tokens: 64") + 1
    with pytest.raises(ParamsError, match=rf"old.yaml:{line}: extensions.stage1_max_new_tokens: the old name of "
                                          r"extensions.phase1_max_new_tokens, which is set too"):
        load_params(recipe)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    exemplars = tmp_path / "exemplars.jsonl"
    exemplars.write_text("not json\n")
    result = subprocess.run([sys.executable, "-m", "slkit", "run", str(SMOKE), "--set", f"output_dir={tmp_path}",
                             "--set", f"queries.exemplar_files=[{exemplars}]"], capture_output=True, text=True)
    assert result.returncode == 2
    assert slkit_message(result.stderr).strip() == f"error: {exemplars}:1: not valid JSON (Expecting value)"
    assert "Traceback" not in result.stderr


def test_run_name_that_leaves_output_dir_is_refused_before_anything_is_written(tmp_path):
    """The bug report: --set run_name=../../escape wrote the run two directories above runs/."""
    out = tmp_path / "a" / "b" / "runs"
    result = subprocess.run([sys.executable, "-m", "slkit", "run", str(SMOKE), "--set", f"output_dir={out}",
                             "--set", "run_name=../../escape"], capture_output=True, text=True)
    assert result.returncode == 2
    message = slkit_message(result.stderr)
    assert message.startswith("error: invalid parameters:\n  --set run_name: ")  # the value came from --set
    assert "'../../escape'" in message
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_names_the_params_to_lower(tmp_path, monkeypatch):
    import torch


    _, run_dir = _prepare(tmp_path)

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("slkit.stages.training.train_adapter", boom)
    (run_dir / "iter_1").mkdir()
    (run_dir / "iter_1" / "extensions.jsonl").write_text(
        '{"id": "a-x0", "draft_id": "a", "sample": 0, "query_id": "q0", "query": "q", "language": "en", "draft": "d.", '
        '"draft_words": 1, "extended": "dd.", "words": 2, "ratio": 2.0, "tries": 1, "micro_iterations_accepted": 1}\n')
    with pytest.raises(MemoryError, match=r"lower training.max_length \(now 256\).*activation_offload.*resume"):
        training_stage(run_dir, 1)
    assert not lock_path(run_dir, 1, "training").exists()


def test_out_of_memory_advice_follows_where_the_error_was_raised():
    """The final stage trains and generates in one process: the advice depends on the code that ran out of
    memory (slkit.training: training params), not on the stage's name."""
    from slkit.stages.common import raised_in_training
    from slkit.training.batches import tokenize_example

    with pytest.raises(AttributeError) as in_training:
        tokenize_example(None, "a prompt", "a completion", 8)  # no tokenizer: fails below slkit.training.batches
    assert raised_in_training(in_training.value)
    with pytest.raises(ValueError) as elsewhere:
        max([])
    assert not raised_in_training(elsewhere.value)
