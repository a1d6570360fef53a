"""tools/migrate_run_dir.py: a run directory of the old stage names resumes under today's names."""
import json
import subprocess
import sys
import warnings

import yaml

from conftest import REPO
from slkit.core.layout import stage_done
from slkit.core.params import load_params


def _old_run(tmp_path):
    run = tmp_path / "run"
    (run / "iter_1").mkdir(parents=True)
    (run / "baseline").mkdir()
    params = load_params(REPO / "params" / "smoke.yaml").to_dict()
    params["extension"] = params.pop("extensions")
    params["queries"]["seed_files"] = params["queries"].pop("exemplar_files")
    params["extension"].pop("phase1_max_new_tokens"), params["extension"].pop("phase2_max_new_tokens")
    params["extension"].update(stage1_max_new_tokens=48, stage2_max_new_tokens=64)
    (run / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("seed", "generate"):
        (run / "iter_1" / f"{stage}.done.json").write_text(json.dumps({"stage": stage, "summary": {"n": 1}}))
    (run / "iter_1" / "train.done.json").write_text(json.dumps({"stage": "train", "summary": {"resampled": 3}}))
    (run / "iter_1" / "extend.done.json").write_text(json.dumps(
        {"stage": "extend", "summary": {"counts": {"round_accepted": 2, "round_rejected_not_longer": 5, "accepted": 1}}}))
    (run / "iter_1" / "extend.lock").write_text("1 boot")
    (run / "iter_1" / "02_extend.ipynb").write_text("{}")
    (run / "iter_1" / "resampled.jsonl").write_text('{"id": "a"}\n')
    (run / "iter_1" / "progress.json").write_text(json.dumps({"stage": "extend", "done": 1, "total": 2}))
    (run / "baseline" / "evaluate.done.json").write_text(json.dumps({"stage": "evaluate", "summary": {}}))
    (run / "baseline" / "metrics.json").write_text("{}")
    return run


def test_an_old_run_directory_gets_todays_names_and_a_second_pass_changes_nothing(tmp_path):
    run = _old_run(tmp_path)
    first = subprocess.run([sys.executable, str(REPO / "tools" / "migrate_run_dir.py"), str(run)],
                           capture_output=True, text=True, check=True)
    assert "seed.done.json -> queries.done.json" in first.stdout
    assert stage_done(run, 1, "queries") and stage_done(run, 1, "drafts") and stage_done(run, 0, "evaluation")
    assert json.loads((run / "iter_1" / "training.done.json").read_text())["summary"] == {"resampled_extensions": 3}
    assert (run / "iter_1" / "extensions.lock").exists() and (run / "iter_1" / "02_extensions.ipynb").exists()
    assert (run / "iter_1" / "resampled_extensions.jsonl").exists() and (run / "baseline" / "evaluation.json").exists()
    assert not (run / "iter_1" / "progress.json").exists()  # today's progress file has more fields
    counts = json.loads((run / "iter_1" / "extensions.done.json").read_text())["summary"]["counts"]
    assert counts == {"micro_iteration_accepted": 2, "micro_iteration_rejected_not_longer": 5, "accepted": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no renamed key is left to warn about
        params = load_params(run / "params.yaml")  # today's schema reads it
    assert (params.extensions.phase1_max_new_tokens, params.extensions.phase2_max_new_tokens) == (48, 64)
    assert "stage1_max_new_tokens" not in (run / "params.yaml").read_text()
    second = subprocess.run([sys.executable, str(REPO / "tools" / "migrate_run_dir.py"), str(run)],
                            capture_output=True, text=True, check=True)
    assert second.stdout.strip() == "nothing to rename"


def test_a_mixed_directory_is_refused_without_renaming(tmp_path):
    run = _old_run(tmp_path)
    (run / "iter_1" / "queries.done.json").write_text("{}")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "migrate_run_dir.py"), str(run)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "queries.done.json exists beside" in result.stderr
    assert (run / "iter_1" / "seed.done.json").exists() and "extension" in yaml.safe_load((run / "params.yaml").read_text())
