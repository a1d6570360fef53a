"""Rename a run directory written by slkit before the one-word-per-stage layout (stages seed, generate, extend,
train, evaluate; params sections extension and queries.seed_files) or before one word per concept (the Extender's
phases, extensions.stage1/stage2_max_new_tokens; micro-iterations, round_* counts) to today's names, in place, so
that `slkit run` resumes it and shows it without warnings. slkit itself does not resume old run directories; this tool exists for long runs started
before the rename (the GPU growth run of docs/results/).

    python tools/migrate_run_dir.py runs/<run>

What it renames: done-markers, locks and executed notebooks of each stage; metrics.json (evaluation.json in
iteration directories, length_control.json in length_control/); resampled.jsonl (resampled_extensions.jsonl) and
its key in the training summary; the extensions summary's round_<verdict> counts (micro_iteration_<verdict>); the
params sections and renamed keys (slkit.core.params.RENAMED_KEYS) in params.yaml; progress.json is removed (the
next stage writes it again). Records themselves keep their fields (slkit reads the old ones under the new names).
Running it twice changes nothing the second time.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from slkit.core.params import RENAMED_KEYS

STAGES = {"seed": "queries", "generate": "drafts", "extend": "extensions", "train": "training", "evaluate": "evaluation"}
NOTEBOOKS = {"00_seed": "00_queries", "01_generate": "01_drafts", "02_extend": "02_extensions", "03_train": "03_training",
             "04_evaluate": "04_evaluation"}


def file_renames(metrics_name: str) -> list[tuple[str, str]]:
    """(old, new) file names in one stage directory; metrics.json becomes `metrics_name`."""
    return ([(f"{old}{suffix}", f"{new}{suffix}") for old, new in STAGES.items() for suffix in (".done.json", ".lock")]
            + [(f"{old}.ipynb", f"{new}.ipynb") for old, new in NOTEBOOKS.items()]
            + [("metrics.json", metrics_name), ("resampled.jsonl", "resampled_extensions.jsonl")])


def stage_dirs(run_dir: Path) -> list[tuple[Path, str]]:
    """Each stage directory of the run with the name its metrics.json takes."""
    dirs = [(d, "evaluation.json") for d in sorted(run_dir.glob("iter_*")) + [run_dir / "baseline"]]
    return [(d, name) for d, name in dirs + [(run_dir / "length_control", "length_control.json")] if d.is_dir()]


def migrate_params(path: Path, done: list[str]) -> None:
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    changed = False
    if "extension" in params:
        params["extensions"] = params.pop("extension")
        changed = True
    queries = params.get("queries", {})
    if "seed_files" in queries:
        queries["exemplar_files"] = queries.pop("seed_files")
        changed = True
    renamed = []
    for old, new in RENAMED_KEYS.items():
        *parents, old_key = old.split(".")
        section = params
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and old_key in section:
            section[new.rsplit(".", 1)[1]] = section.pop(old_key)
            renamed.append(f"{old} -> {new}")
    if changed or renamed:
        path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True), encoding="utf-8")
    if changed:
        done.append(f"{path}: extension -> extensions, queries.seed_files -> queries.exemplar_files")
    if renamed:
        done.append(f"{path}: " + ", ".join(renamed))


def migrate_stage_dir(directory: Path, metrics_name: str, done: list[str]) -> None:
    for old, new in file_renames(metrics_name):
        if (directory / old).exists():
            (directory / old).rename(directory / new)
            done.append(f"{directory / old} -> {new}")
    for new in STAGES.values():
        marker = directory / f"{new}.done.json"
        if marker.exists():
            record = json.loads(marker.read_text(encoding="utf-8"))
            counts = record.get("summary", {}).get("counts") or {}
            old_counts = [k for k in counts if k.startswith("round_")]
            if record.get("stage") in STAGES or "resampled" in record.get("summary", {}) or old_counts:
                record["stage"] = STAGES.get(record["stage"], record["stage"])
                if "resampled" in record["summary"]:
                    record["summary"]["resampled_extensions"] = record["summary"].pop("resampled")
                if old_counts:  # the extensions summary's verdicts per micro-iteration
                    record["summary"]["counts"] = {("micro_iteration_" + k[len("round_"):] if k in old_counts else k): v
                                                   for k, v in counts.items()}
                marker.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
                done.append(f"{marker}: stage name and summary keys")
    progress = directory / "progress.json"
    if progress.exists():  # the running stage's progress bar: rewritten by the next stage that runs
        progress.unlink()
        done.append(f"{progress}: removed")


def migrate(run_dir: Path) -> list[str]:
    if not (run_dir / "params.yaml").is_file():
        raise SystemExit(f"{run_dir} has no params.yaml: not a run directory")
    for directory, metrics_name in stage_dirs(run_dir):  # checked before anything is renamed
        for old, new in file_renames(metrics_name):
            if (directory / old).exists() and (directory / new).exists():
                raise SystemExit(f"{directory / new} exists beside {directory / old}: a half-migrated or mixed run "
                                 f"directory; fix it by hand")
    done: list[str] = []
    migrate_params(run_dir / "params.yaml", done)
    for directory, metrics_name in stage_dirs(run_dir):
        migrate_stage_dir(directory, metrics_name, done)
    return done


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    for line in migrate(Path(sys.argv[1])) or ["nothing to rename"]:
        print(line)
