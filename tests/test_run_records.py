"""Records of a run: slkit.log (the CLI's lines and every stage's, warnings, errors, no secrets), environment.json,
and training metrics through transformers' report_to."""
import importlib
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import REPO, ScriptedEngine
from slkit.evaluation.reports import compare_runs, environment_table
from slkit.running.environment import write_environment
from slkit.core.layout import environment_path, iter_dir, log_path
from slkit.core.params import ParamsError, load_params
from slkit.running.loop import run_loop
from slkit.running.pipeline import check_inputs, prepare_run
from slkit.core.records import read_json, read_jsonl, write_jsonl_atomic
from slkit.core.registry import STAGES
from slkit.stages.queries import queries_stage
from test_stages import _answer, fake_train

SECRET = "sk-this-key-must-never-be-logged"


@pytest.fixture
def scripted_pipeline(monkeypatch):
    """`slkit run` whose notebooks are their stage functions called in this process, generating with a scripted
    engine and training fake adapters (no kernel, no model)."""
    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters=None: ScriptedEngine(_answer))
    monkeypatch.setattr("slkit.stages.training.train_adapter", fake_train)
    monkeypatch.setattr("slkit.stages.length_control.train_adapter", fake_train)
    monkeypatch.setattr("slkit.stages.evaluation.write_iteration_figures", lambda *a: [])
    monkeypatch.setattr("slkit.running.pipeline.ensure_kernel", lambda: "slkit")
    monkeypatch.setattr("slkit.running.kernels.KernelsAhead.start", lambda self, notebook: None)  # no kernels here

    def run_stage(source, executed, parameters, kernel, socket_dir, km=None):
        stage = next(s for s in STAGES if s.notebook == Path(source).name)
        getattr(importlib.import_module(stage.module), stage.function)(parameters["run_dir"], parameters["iteration"])

    monkeypatch.setattr("slkit.running.pipeline.run_notebook", run_stage)
    monkeypatch.setenv("SLKIT_TEST_KEY", SECRET)


NOISY_LIBRARY = """import logging, warnings
logging.getLogger("noisy_library.backends").warning("Failed to load CPU kernel from the hub: No module named 'kernels'")
warnings.warn("noisy_library: this default changes in the next release", FutureWarning)
"""


def test_another_packages_lines_go_to_slkit_log_not_the_terminal(scripted_pipeline, tmp_path, monkeypatch, capfd):
    """The bug report: on a CPU with AVX-512 BF16, `import peft` imports bitsandbytes, which logs "Failed to load
    CPU gemm_4bit_forward from kernels-community" above every `slkit run`. A package's log line and warning on
    import, before the run log opens, and its lines while it is open, go to slkit.log; only its error reaches the
    terminal, beside slkit's own lines."""
    from slkit.running import pipeline
    from slkit.running.cli import main

    (tmp_path / "lib" / "noisy_library").mkdir(parents=True)
    (tmp_path / "lib" / "noisy_library" / "__init__.py").write_text(NOISY_LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.delitem(sys.modules, "noisy_library", raising=False)
    checked = pipeline.check_inputs

    def import_then_check(*args, **kwargs):  # imported before the run log opens, as `import peft` is
        importlib.import_module("noisy_library")
        return checked(*args, **kwargs)

    def kernel_with_lines():
        logging.getLogger("noisy_library").warning("a line while the run log is open")
        logging.getLogger("noisy_library").error("noisy_library: a real problem")
        return "slkit"

    monkeypatch.setattr(pipeline, "check_inputs", import_then_check)
    monkeypatch.setattr(pipeline, "ensure_kernel", kernel_with_lines)
    handlers, show = logging.getLogger().handlers[:], warnings.showwarning
    capfd.readouterr()
    assert main(["run", str(REPO / "params" / "smoke.yaml"), "--no-progress", "--set", f"output_dir={tmp_path / 'runs'}",
                 "--set", "macro_iterations=1", "--set", "evaluation.judge.enabled=false"]) == 0
    out, err = capfd.readouterr()
    run_dir = tmp_path / "runs" / "smoke"
    assert out.endswith(f"done: {run_dir}\n")
    assert err.startswith("noisy_library: a real problem\n")  # (then the stand-in training's progress bars)
    for line in ("Failed to load CPU kernel", "this default changes", "a line while the run log is open"):
        assert line not in out + err
    log = log_path(run_dir).read_text()
    pid = os.getpid()
    assert f"WARNING [pid {pid}] Failed to load CPU kernel from the hub: No module named 'kernels'" in log
    assert f"WARNING [pid {pid}] FutureWarning: noisy_library: this default changes in the next release (" in log
    assert f"WARNING [pid {pid}] a line while the run log is open" in log
    assert f"ERROR [pid {pid}] noisy_library: a real problem" in log
    assert log.index("Failed to load CPU kernel") < log.index("a line while the run log is open")
    assert log.count("Failed to load CPU kernel") == 1
    assert logging.getLogger().handlers == handlers and warnings.showwarning is show  # put back after the command


def test_a_run_logs_every_stage_start_and_end_with_counts_to_slkit_log(scripted_pipeline, tmp_path):
    overrides = {"output_dir": str(tmp_path), "macro_iterations": 1, "evaluation.judge.enabled": False,
                 "engine.endpoint.api_key_env": "SLKIT_TEST_KEY"}
    run_dir = run_loop(REPO / "params" / "smoke.yaml", overrides, show_progress=False)
    log = log_path(run_dir).read_text()
    labels = ["baseline evaluation"] + [f"iteration 1 {s}" for s in ("queries", "drafts", "extensions", "training",
                                                                      "evaluation")] + ["length_control (after iteration 1)"]
    for label in labels:
        assert f"INFO [pid {os.getpid()}] {label}: start" in log
        assert re.search(rf"{re.escape(label)}: done in \d+\.\d s: ", log), label
    queries = len(read_jsonl(iter_dir(run_dir, 1) / "queries.jsonl"))
    assert re.search(rf"iteration 1 queries: done in \d+\.\d s: queries={queries} ", log)
    assert "iteration 1 drafts: executing 01_drafts.ipynb" in log  # the CLI's line before the notebook's
    assert log.splitlines()[-1].endswith("run finished")
    assert SECRET not in log

    run_loop(REPO / "params" / "smoke.yaml", overrides, show_progress=False)  # everything is done: skipped
    assert "iteration 1 drafts: done before, skipped" in log_path(run_dir).read_text()


def test_a_failing_stage_logs_the_error_with_its_traceback(tmp_path, monkeypatch):
    class Broken(ScriptedEngine):
        def generate(self, requests, sampling, on_done=None):
            raise RuntimeError("the engine broke")

    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters=None: Broken(_answer))
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match="the engine broke"):
        queries_stage(run_dir, 1)
    log = log_path(run_dir).read_text()
    assert re.search(r"ERROR \[pid \d+\] iteration 1 queries: failed after \d+\.\d s: RuntimeError: the engine broke", log)
    assert "Traceback (most recent call last)" in log and "in generate" in log


def test_warnings_shown_during_a_stage_reach_the_log_and_are_still_shown(tmp_path, monkeypatch):
    class Warns(ScriptedEngine):
        def generate(self, requests, sampling, on_done=None):
            warnings.warn("the engine is unsure", UserWarning)
            return super().generate(requests, sampling, on_done)

    monkeypatch.setattr("slkit.stages.common.load_engine", lambda params, adapters=None: Warns(_answer))
    _, run_dir = prepare_run(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path)})
    with pytest.warns(UserWarning, match="the engine is unsure"):
        queries_stage(run_dir, 1)
    assert re.search(r"WARNING \[pid \d+\] UserWarning: the engine is unsure \(test_run_records.py:\d+\)",
                     log_path(run_dir).read_text())
    assert warnings.showwarning.__name__ != "show_and_log"  # put back when the stage ends


def test_environment_json_records_versions_gpus_and_the_slkit_commit(scripted_pipeline, tmp_path, monkeypatch):
    run_dir = run_loop(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path), "macro_iterations": 1,
                                                            "length_control.enabled": False}, show_progress=False)
    env = read_json(environment_path(run_dir))
    assert set(env) >= {"python", "packages", "cuda", "gpus", "slkit", "started_at"}
    assert set(env["packages"]) >= {"torch", "transformers", "peft", "vllm", "bitsandbytes"}
    import torch
    import transformers

    assert env["packages"]["transformers"] == transformers.__version__ and env["cuda"] == torch.version.cuda
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert env["slkit"]["git"]["commit"] == head
    assert SECRET not in environment_path(run_dir).read_text()  # no environment variables

    # A run resumed in another environment keeps the one it started in.
    monkeypatch.setattr("slkit.running.environment.package_version", lambda name: "9.9")
    write_environment(run_dir)
    again = read_json(environment_path(run_dir))
    assert again["packages"]["torch"] == "9.9" and again["earlier"][0]["packages"] == env["packages"]

    # The report shows it: the evaluation notebook's table and `slkit compare`'s summary.
    row = environment_table([run_dir]).iloc[0]
    assert row["torch"] == "9.9" and row["slkit"].startswith(head[:10])
    summary = (compare_runs([run_dir], tmp_path / "compare")["out"] / "summary.md").read_text()
    assert "## Environment" in summary and head[:10] in summary


def test_report_to_reaches_the_trainer_and_tensorboard_writes_beside_the_run(smoke_params, tiny_model_path,
                                                                              tmp_path, monkeypatch):
    """transformers builds the callback of each report_to integration; a stand-in for tensorboard's records
    what it was given (tensorboard is not installed here)."""
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    from slkit.training.adapters import train_adapter

    class FakeTensorBoard(TrainerCallback):
        made = []

        def __init__(self):
            self.dir, self.logs, self.args = os.environ.get("TENSORBOARD_LOGGING_DIR"), [], None
            FakeTensorBoard.made.append(self)

        def on_train_begin(self, args, state, control, **kwargs):
            self.args = args

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(logs)

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", FakeTensorBoard)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    params = smoke_params.model_copy(update={"training": smoke_params.training.model_copy(
        update={"report_to": "tensorboard"})})
    examples = tmp_path / "iter_1" / "generator_sft.jsonl"
    examples.parent.mkdir()
    write_jsonl_atomic(examples, [{"id": str(i), "prompt": f"Write {i}.", "completion": "words " * 20} for i in range(2)])
    train_adapter(params, examples, tmp_path / "iter_1" / "adapters" / "generator")
    [board] = FakeTensorBoard.made
    assert board.dir == str(tmp_path / "iter_1" / "tensorboard" / "generator")
    assert board.args.report_to == ["tensorboard"] and board.args.run_name == "smoke/iter_1/generator"
    assert any("loss" in logs for logs in board.logs)
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for Trainer's construction only


def test_report_to_names_known_integrations_and_they_must_be_installed(tmp_path):
    with pytest.raises(ParamsError, match=r"training\.report_to: .*'comet'.* tensorboard, wandb, mlflow"):
        load_params(REPO / "params" / "smoke.yaml", {"training.report_to": "comet"})
    assert load_params(REPO / "params" / "smoke.yaml", {"training.report_to": ["tensorboard", "mlflow"]})
    from transformers.integrations import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here")
    with pytest.raises(ParamsError, match=r"smoke\.yaml: training\.report_to: wandb not installed \(pip install wandb\)"):
        check_inputs(REPO / "params" / "smoke.yaml", {"output_dir": str(tmp_path), "training.report_to": "wandb"})
