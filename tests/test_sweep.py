"""`slkit sweep`: the grid expands to one run per combination with stable names, a bad grid is one clear error
before anything runs, --gpus hands each run one GPU, a failed run does not stop the others, and (slow) a real
sweep of the smoke recipe runs, resumes without redoing finished work and writes the compare report."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO

from slkit.core.params import ParamsError, parse_overrides
from slkit.running.cli import main
from slkit.running.sweep import parse_gpus, parse_grid, plan_sweep, run_command, run_sweep

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`

SMOKE = REPO / "params" / "smoke.yaml"


def test_the_grid_expands_to_every_combination_named_after_its_values(tmp_path):
    grid = {"training.learning_rate": [1e-4, 2e-4], "seed": [0, 1, 2]}
    runs = plan_sweep(SMOKE, grid, {"output_dir": str(tmp_path)})
    assert [r.name for r in runs] == [f"smoke--learning_rate-{lr}--seed-{s}" for lr in ("0.0001", "0.0002") for s in (0, 1, 2)]
    assert [r.overrides for r in runs] == [{"training.learning_rate": lr, "seed": s} for lr in (1e-4, 2e-4) for s in (0, 1, 2)]
    for run in runs:  # each run's params carry its values, its name and the sweep's --set
        assert (run.params.training.learning_rate, run.params.seed) == (run.overrides["training.learning_rate"], run.overrides["seed"])
        assert run.params.run_name == run.name and run.run_dir == tmp_path / run.name
    # stable: the same sweep names its runs the same way again (a rerun resumes them); --set run_name is the base
    assert [r.name for r in plan_sweep(SMOKE, grid, {"output_dir": str(tmp_path)})] == [r.name for r in runs]
    assert plan_sweep(SMOKE, {"seed": [3]}, {"run_name": "lr"})[0].name == "lr--seed-3"


def test_run_names_are_one_safe_directory_name_each(tmp_path):
    # two grid keys ending alike keep their dotted paths; paths and lists become letters, digits, '-', '_', '.'
    runs = plan_sweep(SMOKE, {"queries.max_tries": [1], "drafts.max_tries": [2]})
    assert runs[0].name == "smoke--queries.max_tries-1--drafts.max_tries-2"
    runs = plan_sweep(SMOKE, {"evaluation.benchmark": ["builtin:lengths-mini", "tests/fixtures/longen_mini.jsonl"],
                              "queries.languages": [["en"], ["en", "zh"]]})
    assert [r.name for r in runs] == ["smoke--benchmark-builtin-lengths-mini--languages-en",
                                      "smoke--benchmark-builtin-lengths-mini--languages-en-zh",
                                      "smoke--benchmark-tests-fixtures-longen_mini.jsonl--languages-en",
                                      "smoke--benchmark-tests-fixtures-longen_mini.jsonl--languages-en-zh"]
    long = plan_sweep(SMOKE, {"quality.meta_words": [{"en": ["x" * 150], "zh": []}, {"en": ["x" * 151], "zh": []}]})
    assert all(len(r.name) <= 120 for r in long) and long[0].name != long[1].name
    with pytest.raises(ParamsError, match=r"all give the run name smoke--benchmark-a-b"):
        plan_sweep(SMOKE, {"evaluation.benchmark": ["a/b", "a-b"]})


def test_grid_values_are_read_as_set_reads_a_value():
    grid = parse_grid(["training.learning_rate=1e-4,2e-4", "queries.languages=[en],[en, zh]", "model.load_in_4bit=true,false"])
    assert grid == {"training.learning_rate": [1e-4, 2e-4],  # floats, as in a recipe file
                    "queries.languages": [["en"], ["en", "zh"]], "model.load_in_4bit": [True, False]}
    with pytest.raises(ParamsError, match=r"--grid seed: 1 given more than once"):
        parse_grid(["seed=1,2,1"])
    with pytest.raises(ParamsError, match=r"--grid seed: no values"):
        parse_grid(["seed="])
    with pytest.raises(ParamsError, match=r"--grid seed is given twice"):
        parse_grid(["seed=1", "seed=2"])
    with pytest.raises(ParamsError, match=r"--grid expects KEY=V1,V2, got 'seed'"):
        parse_grid(["seed"])
    with pytest.raises(ParamsError, match=r"--grid seed=\[1: not a comma-separated list"):
        parse_grid(["seed=[1"])
    assert parse_gpus("0, 1,3") == ["0", "1", "3"]
    with pytest.raises(ParamsError, match=r"--gpus .*'0,0'"):
        parse_gpus("0,0")


@pytest.mark.parametrize("args, error", [
    (["--grid", "training.learnin_rate=1e-4,2e-4"], r"^error: --grid training.learnin_rate: no such param; did you "
                                                    r"mean training.learning_rate\?$"),
    (["--grid", "trainig=1,2"], r"^error: --grid trainig: no such param; did you mean training\?$"),
    (["--grid", "run_name=a,b"], r"^error: --grid run_name: the sweep names each run"),
    (["--grid", "seed=1,2", "--set", "seed=3"], r"^error: --grid seed is also given with --set"),
    (["--grid", "seed=1,two"], r"^error: sweep run smoke--seed-two \(--grid values seed=\"two\"\): invalid parameters:\n  "
                                  r".*seed: .*'two'\)$"),
], ids=["misspelt key", "misspelt section", "run_name", "key also in --set", "value of the wrong type"])
def test_a_bad_grid_is_one_clear_error_before_anything_runs(tmp_path, capsys, args, error):
    out = tmp_path / "sweep"
    assert main(["sweep", str(SMOKE), *args, "--set", f"output_dir={tmp_path}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert re.match(error, err, re.S), err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())  # nothing written


class FakeLauncher:
    """Stands in for `slkit run`: records the command and CUDA_VISIBLE_DEVICES of each run, holds a run long
    enough for runs to overlap, and fails the runs named in `fail`."""

    def __init__(self, fail=(), seconds=0.3):
        self.fail, self.seconds = set(fail), seconds
        self.calls, self.busy, self.overlap = [], {}, []
        self.lock = threading.Lock()

    def __call__(self, command, env, log):
        name = next(a.split("=", 1)[1] for a in command if a.startswith("run_name="))
        name = json.loads(name)
        gpu = env.get("CUDA_VISIBLE_DEVICES")
        with self.lock:
            self.calls.append((name, gpu, command))
            self.busy[gpu] = self.busy.get(gpu, 0) + 1
            self.overlap.append((gpu, self.busy[gpu], sum(self.busy.values())))
        time.sleep(self.seconds)
        with self.lock:
            self.busy[gpu] -= 1
        log.write_text("error: this run was told to fail\n" if name in self.fail else "done\n")
        return 1 if name in self.fail else 0


def test_gpus_give_each_run_one_gpu_and_a_failed_run_does_not_stop_the_others(tmp_path):
    grid = {"seed": [0, 1, 2, 3]}
    launcher = FakeLauncher(fail={"smoke--seed-1"})
    hub_model = "Qwen/Qwen2.5-0.5B-Instruct"  # a hub id: nothing to build before parallel runs start
    state = run_sweep(SMOKE, grid, {"output_dir": str(tmp_path), "model.path": hub_model}, gpus=["0", "1"],
                      out=tmp_path / "sweep", launch=launcher, report=lambda line: None)
    assert sorted(name for name, _, _ in launcher.calls) == [f"smoke--seed-{s}" for s in range(4)]
    assert {gpu for _, gpu, _ in launcher.calls} == {"0", "1"}
    assert max(on_gpu for _, on_gpu, _ in launcher.overlap) == 1  # never two runs on one GPU
    assert max(total for _, _, total in launcher.overlap) == 2  # but both GPUs busy at once
    name, _, command = launcher.calls[0]
    assert command[:6] == [sys.executable, "-m", "slkit", "run", str(SMOKE), "--no-progress"]
    assert command[6:] == ["--set", f"output_dir={json.dumps(str(tmp_path))}", "--set", f"model.path=\"{hub_model}\"",
                           "--set", f"seed={name[-1]}", "--set", f"run_name={json.dumps(name)}"]
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(state))
    assert saved["grid"] == grid and saved["gpus"] == ["0", "1"]
    by_name = {r["run_name"]: r for r in saved["runs"]}
    assert [r["overrides"] for r in saved["runs"]] == [{"seed": s} for s in range(4)]
    assert by_name["smoke--seed-1"]["status"] == "failed" and by_name["smoke--seed-1"]["returncode"] == 1
    assert by_name["smoke--seed-1"]["error"] == "error: this run was told to fail"
    assert all(by_name[f"smoke--seed-{s}"]["status"] == "done" for s in (0, 2, 3))
    assert {r["gpu"] for r in saved["runs"]} == {"0", "1"}
    assert "compare" not in saved  # the fake runs wrote no run directory to compare


def test_without_gpus_the_runs_go_one_at_a_time_on_the_callers_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    launcher = FakeLauncher(seconds=0.05)
    run_sweep(SMOKE, {"seed": [0, 1]}, {"output_dir": str(tmp_path)}, out=tmp_path / "sweep", launch=launcher,
              report=lambda line: None)
    assert [(name, gpu) for name, gpu, _ in launcher.calls] == [("smoke--seed-0", "7"), ("smoke--seed-1", "7")]
    assert max(total for _, _, total in launcher.overlap) == 1


def test_gpus_refuse_runs_that_need_several(tmp_path):
    with pytest.raises(ParamsError, match=r"smoke--seed-0, smoke--seed-1 need several"):
        run_sweep(SMOKE, {"seed": [0, 1]}, {"output_dir": str(tmp_path), "training.num_processes": 2}, gpus=["0", "1"],
                  out=tmp_path / "sweep", launch=FakeLauncher(), report=lambda line: None)


def test_a_run_command_round_trips_its_values(tmp_path):
    """What the sweep passes to `slkit run` reads back, through --set's own parser, to the grid's values."""
    run = plan_sweep(SMOKE, {"training.learning_rate": [2e-5], "queries.languages": [["zh"]],
                             "evaluation.benchmark": ["builtin:lengths-mini"]})[0]
    command = run_command(SMOKE, {"output_dir": str(tmp_path)}, run)
    sets = parse_overrides([command[i + 1] for i, a in enumerate(command) if a == "--set"])
    assert sets == {"output_dir": str(tmp_path), **run.overrides, "run_name": run.name}


@pytest.mark.slow
def test_a_sweep_of_the_smoke_recipe_runs_resumes_and_compares(tmp_path, tiny_model_path):
    """Two real `slkit run`s (papermill, the tiny random model, one macro-iteration on a 4-query subset, no
    baseline, judge or final stage), then the same command again: nothing is redone."""
    command = [sys.executable, "-m", "slkit", "sweep", str(SMOKE), "--grid", "seed=0,1",
               "--set", f"output_dir={tmp_path}", "--set", "macro_iterations=1", "--set", "evaluation.subset_size=4",
               "--set", "evaluation.baseline=false", "--set", "evaluation.judge.enabled=false",
               "--set", "length_control.enabled=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    sweep_dir = tmp_path / "smoke--sweep"
    saved = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["run_name"], r["overrides"], r["status"]) for r in saved["runs"]] == [
        ("smoke--seed-0", {"seed": 0}, "done"), ("smoke--seed-1", {"seed": 1}, "done")]
    for seed in (0, 1):
        run_dir = tmp_path / f"smoke--seed-{seed}"
        assert (run_dir / "iter_1" / "evaluation.done.json").exists() and not (run_dir / "iter_2").exists()
        assert f"seed: {seed}\n" in (run_dir / "params.yaml").read_text()
    table = (sweep_dir / "summary.md").read_text().split("\n\n")[0].splitlines()  # the scores; the environment follows
    assert [line.split(" | ")[0:2] for line in table[2:]] == [["| smoke--seed-0", "1"], ["| smoke--seed-1", "1"]]
    for figure in ("lengths", "required_vs_produced", "length_scores", "filter_rates", "distinct_n"):
        assert (sweep_dir / f"{figure}.png").stat().st_size > 5000, figure
    assert saved["compare"]["runs"] == [str(tmp_path / "smoke--seed-0"), str(tmp_path / "smoke--seed-1")]
    records = {p: p.stat().st_mtime_ns for p in tmp_path.glob("smoke--seed-*/**/*") if p.is_file()
               and p.suffix in (".jsonl", ".ipynb", ".safetensors")}
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {p: p.stat().st_mtime_ns for p in records} == records  # every stage of both runs was skipped
    assert [r["status"] for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]] == ["done", "done"]


def test_the_readme_names_the_runs_as_the_sweep_does():
    runs = plan_sweep(REPO / "params" / "qwen2.5-3b-16gb.yaml",
                      {"training.learning_rate": [1e-4, 2e-4], "extensions.min_ratio": [1.2, 1.5]})
    assert len(runs) == 4 and f"`runs/{runs[0].name}`" in (REPO / "README.md").read_text()
