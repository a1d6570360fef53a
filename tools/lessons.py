"""The six lessons executed on a finished run, as readable copies in docs/lessons/ (GitHub shows them, outputs,
tables and figures included, to a reader without a GPU).

    python tools/lessons.py runs/demo                 # -> docs/lessons/00_queries.ipynb ... 05_length_control.ipynb
    python tools/lessons.py runs/demo --execute       # all six executed again (after a change to slkit/lessons/)
    python tools/lessons.py runs/demo --out /tmp/x    # somewhere else
    make lessons                                      # runs/demo --execute

Lessons 00-04 come from the run's last macro-iteration, 05 from its final stage. Each is the notebook the run
executed when its cells are those of notebooks/ now; a notebook edited since the run is executed again on the
run with papermill (the run's stages are finished, so each stage call reads the stage's recorded summary and
nothing is generated or trained again). What a notebook shows also depends on slkit/lessons/, which the copy
cannot tell: after a change there, --execute executes all six again.

The copies are scrubbed of the machine: absolute paths of the repository, the run (where it is and where it
ran), the Python environment and the home directory become relative paths or placeholders, the values of
environment variables that look like secrets are redacted, and a copy that still names an absolute path or a
token is refused. Execution timing and papermill's random cell id are dropped, so a copy changes only where
its content does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("00_queries", "01_drafts", "02_extensions", "03_training", "04_evaluation", "05_length_control")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
# What no copy may still hold once scrubbed: an absolute path under a machine's usual roots, or a token's shape.
LEAKS = re.compile(r"(?<![\w.])/(?:home|root|Users|tmp|work|scratch|mnt|opt|var|srv|data)/[^\s\"'`)]*"
                   r"|\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}")


def sources(notebook: dict) -> list[tuple[str, str]]:
    """The cells a lesson is made of, without papermill's injected parameters cell."""
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]
            if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def executed_path(run_dir: Path, name: str, iteration: int) -> Path:
    return run_dir / ("length_control" if name == "05_length_control" else f"iter_{iteration}") / f"{name}.ipynb"


def finished(run_dir: Path, iteration: int) -> list[str]:
    """What the run has not finished among the stages the six lessons show."""
    stages = [f"iter_{iteration}/{stage}.done.json" for stage in ("queries", "drafts", "extensions", "training",
                                                                  "evaluation")]
    stages.append("length_control/length_control.done.json")
    return [s for s in stages if not (run_dir / s).is_file()]


def execute(name: str, run_dir: Path, iteration: int, target: Path) -> None:
    """notebooks/<name>.ipynb executed on the finished run, as `slkit run` executes it (kernel slkit, from the
    repository's root, over a Unix socket in a private directory where zmq has them); its stage returns the summary
    the run recorded."""
    import papermill as pm
    import zmq
    from traitlets.config import Config

    run = run_dir.resolve()  # the kernel runs from the repository's root
    shown = os.path.relpath(run, REPO) if run.is_relative_to(REPO) else str(run)
    connection = {"transport": "ipc", "ip": str(target.parent / "kernel")} if zmq.has("ipc") else {}
    pm.execute_notebook(str(REPO / "notebooks" / f"{name}.ipynb"), str(target),
                        parameters={"run_dir": shown, "iteration": iteration}, kernel_name="slkit",
                        progress_bar=False, cwd=str(REPO), config=Config({"KernelManager": connection}))


def replacements(run_dir: Path) -> list[tuple[str, str]]:
    """(machine-specific text, what the copy shows instead), longest first: this machine's, and those of the
    machine and directory the run ran in (a run copied from elsewhere), from its params.yaml and environment.json."""
    run = run_dir.resolve()
    pairs = {str(REPO): "."}
    for prefix, shown in ((sys.base_prefix, "<python>"), (sys.prefix, "<venv>"),
                          (sysconfig.get_paths()["purelib"], "<site-packages>")):
        pairs[prefix] = pairs[str(Path(prefix).resolve())] = shown
    snapshot = yaml.safe_load((run_dir / "params.yaml").read_text(encoding="utf-8"))
    environment = run_dir / "environment.json"
    ran = json.loads(environment.read_text(encoding="utf-8")) if environment.is_file() else {}
    if ran.get("executable"):
        pairs[str(Path(ran["executable"]).parent.parent)] = "<venv>"
    if (ran.get("slkit") or {}).get("source"):
        pairs[ran["slkit"]["source"]] = "."
    for where in (run, Path(snapshot.get("output_dir", "runs")) / snapshot["run_name"]):
        if where.is_absolute():
            pairs[str(where)] = f"runs/{run.name}"
    pairs[str(Path.home())] = "~"
    for key, value in os.environ.items():
        if SECRET_NAME.search(key) and len(value) >= 8:
            pairs[value] = f"<{key} redacted>"
    # a path ends with the text: "/x/repo/" becomes "./" and is then tidied by scrub()
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def scrub(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return re.sub(r"(?<![\w.])\./(?=[\w<])", "", text)  # "./slkit/x.py" -> "slkit/x.py"


def clean(notebook: dict, name: str, executed: str) -> dict:
    """Execution timing dropped (papermill's and Jupyter's, per cell and per notebook): a regenerated copy differs
    only where its content does. papermill's paths name the notebook and the run's executed copy, wherever it was
    executed."""
    for cell in notebook["cells"]:
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["id"] = "injected-parameters"  # papermill draws a new one each time
        cell.get("metadata", {}).pop("papermill", None)
        cell.get("metadata", {}).pop("execution", None)
    papermill = notebook.get("metadata", {}).get("papermill", {})
    for key in ("environment_variables", "start_time", "end_time", "duration"):
        papermill.pop(key, None)
    papermill.update({"input_path": f"notebooks/{name}.ipynb", "output_path": executed})
    return notebook


def make_copy(run_dir: Path, name: str, iteration: int, out: Path, scratch: Path, again: bool = False) -> str:
    """Write docs' copy of one lesson (executed again when `again`); says how it was made."""
    executed = executed_path(run_dir, name, iteration)
    current = json.loads((REPO / "notebooks" / f"{name}.ipynb").read_text(encoding="utf-8"))
    made = json.loads(executed.read_text(encoding="utf-8")) if executed.is_file() else None
    if made is not None and sources(made) == sources(current) and not again:
        how, source = "copied from the run", executed
    else:
        source = scratch / f"{name}.ipynb"
        execute(name, run_dir, iteration, source)
        how = "executed again on the finished run" + ("" if again else ": notebooks/ changed since it ran")
    shown = f"runs/{run_dir.resolve().name}/{executed.relative_to(run_dir).as_posix()}"
    text = json.dumps(clean(json.loads(source.read_text(encoding="utf-8")), name, shown), indent=1,
                      ensure_ascii=False) + "\n"
    text = scrub(text, replacements(run_dir))
    leaks = sorted(set(LEAKS.findall(text)))
    if leaks:
        raise SystemExit(f"{name}: the copy still names {', '.join(leaks[:5])}: add a replacement to tools/lessons.py")
    (out / f"{name}.ipynb").write_text(text, encoding="utf-8")
    return how


TITLES = {"00_queries": "the model writes its own writing requests", "01_drafts": "the Generator answers",
          "02_extensions": "the Extender lengthens the drafts",
          "03_training": "the loop learns from its own long texts",
          "04_evaluation": "does the Generator follow length constraints?",
          "05_length_control": "teach the Generator to follow a length"}


def index(run_dir: Path, snapshot: dict, made: dict[str, str]) -> str:
    """docs/lessons/README.md: the six lessons and where they come from."""
    path = run_dir / "environment.json"
    environment = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    commit = ((environment.get("slkit") or {}).get("git") or {}).get("commit")
    lines = [f"# The lessons, executed on the `{snapshot['run_name']}` run", "",
             f"The six notebooks of [notebooks/](../../notebooks/) executed on the `{snapshot['run_name']}` run "
             f"(model `{snapshot['model']['path']}`, {snapshot['macro_iterations']} macro-iteration(s)"
             + (f"; its stages ran on slkit {commit[:10]}" if commit else "") + "), outputs, tables and figures "
             "included. Lessons 00-04 "
             "are its last macro-iteration, 05 its final stage. Made by `make lessons` (tools/lessons.py); the "
             "README's *Learn the method* says how to read them and run your own.", ""]
    lines += [f"- [{name}]({name}.ipynb): {TITLES[name]} ({made[name]})" for name in NOTEBOOKS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run, e.g. runs/demo")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lessons")
    parser.add_argument("--execute", action="store_true",
                        help="execute all six again on the run, not only those whose cells changed since it ran")
    args = parser.parse_args(argv)
    snapshot = args.run_dir / "params.yaml"
    if not snapshot.is_file():
        raise SystemExit(f"{args.run_dir}: not a run directory (no params.yaml)")
    run = yaml.safe_load(snapshot.read_text(encoding="utf-8"))
    iteration = run["macro_iterations"]
    missing = finished(args.run_dir, iteration)
    if missing:
        raise SystemExit(f"{args.run_dir} is not finished: no {', '.join(missing)} (run `slkit run` to the end first)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slkit-lessons-") as scratch:
        made = {}
        for name in NOTEBOOKS:
            made[name] = make_copy(args.run_dir, name, iteration, args.out, Path(scratch), args.execute)
            size = (args.out / f"{name}.ipynb").stat().st_size
            print(f"{args.out / name}.ipynb: {made[name]}, {size / 1024:.0f} KiB")
    (args.out / "README.md").write_text(scrub(index(args.run_dir, run, made), replacements(args.run_dir)),
                                        encoding="utf-8")


if __name__ == "__main__":
    main()
