"""One macro-iteration of the loop, timed per stage, before and after a change (issue 24).

    python bench/loop.py prepare --before 2a7f7c2 --dest .loopbench        # here: both code folders + LonGen
    python bench/loop.py run --variant before=CODE_DIR --variant after=CODE_DIR --workdir W   # the GPU machine
    python bench/loop.py collect --workdir W --out $OUT                    # rows so far + the runs' small files
    python bench/loop.py table docs/results/loop-bench/rows.jsonl          # the table, ratios side by side
    python bench/loop.py timeline docs/results/loop-bench/rows.jsonl       # -> docs/results/loop-bench/timeline.png

`run` runs `slkit run` once per variant, one after the other, each with its own code first on PYTHONPATH (its
`slkit/` and `notebooks/`), in W with the same recipe, overrides and seeds: the 1.5B growth recipe at the issue's
scale (OVERRIDES: 100 queries, draft tries 5, extension tries 2, every draft and extension cap 4,096, both judges
off, one macro-iteration, no final stage, and no baseline evaluation: the issue times a macro-iteration, and the
baseline adds an evaluation to both variants). While a run's server is up (runs/<run>/engine.json, the run-managed
`vllm serve`), its /metrics are sampled every second into W/loop-bench/<variant>.metrics.jsonl: a server reports
no generated tokens per stage, its counters do. Each variant's rows go to W/loop-bench/rows.jsonl as it ends.

A row per stage (and one for the whole run, stage "run") is read from what the run leaves: slkit.log (each
stage's "executing", "start" and "done in" lines), <stage>.done.json (its summary) and engine_timings.jsonl
(in-process engines' ready/closed; the run server's server_start, server_stop, sleep, wake; other events are
skipped). Fields: variant, stage, iteration, status, start, end (Unix time), seconds, kernel_s (notebook start to
the stage's own start), engine_starts, engine_start_s, generated_tokens, generate_s (engine busy: closed events'
generate_s, or the seconds in which the server's token counter grew), tokens_per_s (generated / generate_s),
wall_tokens_per_s (generated / seconds); extensions: jobs, extensions, accepted_share; training: train_s, steps.
The run row adds the lanes of the timeline (engine: start, up, generating, asleep; training).
slkit.log's times are the writing machine's local time: extract rows on the machine that ran (`run`, `collect`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = "params/growth-qwen2.5-1.5b.yaml"
OVERRIDES = {"queries.per_language": 50, "drafts.max_tries": 5, "extensions.max_tries": 2,
             "drafts.max_new_tokens": 4096, "extensions.phase1_max_new_tokens": 4096,
             "extensions.phase2_max_new_tokens": 4096, "queries.judge": False, "evaluation.judge.enabled": False,
             "macro_iterations": 1, "length_control.enabled": False, "evaluation.baseline": False}
STAGES = ("queries", "drafts", "extensions", "training", "evaluation", "length_control")
STARTS = {"ready", "server_start"}  # engine_timings events that mean an engine started
METRICS = {"vllm:generation_tokens_total": "generation_tokens", "vllm:prompt_tokens_total": "prompt_tokens",
           "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting"}
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ \[pid \d+\] (.*)$")
STAGE_LINE = re.compile(r"^(baseline evaluation|iteration (\d+) (\w+)|length_control \(after iteration (\d+)\))"
                        r": (executing \S+|start|done in ([\d.]+) s)")


# ---------------------------------------------------------------------------------------------- reading a run

def log_time(stamp: str, millis: str) -> float:
    return time.mktime(dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timetuple()) + int(millis) / 1000


def read_log(run_dir: Path) -> tuple[dict[str, float], dict[tuple[int, str], dict[str, float]]]:
    """(run-level times: started, finished; per (iteration, stage): executing, start, done and done_s), the last
    attempt of each stage when a run was resumed."""
    run: dict[str, float] = {}
    stages: dict[tuple[int, str], dict[str, float]] = {}
    path = run_dir / "slkit.log"
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []):
        m = LOG_LINE.match(line)
        if not m:
            continue
        at, message = log_time(m[1], m[2]), m[3]
        if message.startswith("slkit run ") and "macro-iterations" in message:
            run.setdefault("started", at)
        elif message == "run finished":
            run["finished"] = at
        s = STAGE_LINE.match(message)
        if not s:
            continue
        if s[1] == "baseline evaluation":
            key = (0, "evaluation")
        elif s[3]:
            key = (int(s[2]), s[3])
        else:
            key = (int(s[4]), "length_control")
        times = stages.setdefault(key, {})
        if s[5].startswith("executing"):
            stages[key] = times = {"executing": at}
        elif s[5] == "start":
            times["start"] = at
        else:
            times.update(done=at, done_s=float(s[6]))
        run["last"] = at
    return run, stages


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """engine_timings.jsonl's lines (a torn or foreign line is skipped)."""
    path = run_dir / "engine_timings.jsonl"
    events = []
    for line in (path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("at"), (int, float)):
            events.append(event)
    return sorted(events, key=lambda e: e["at"])


def read_metrics(path: Path | None) -> list[dict[str, float]]:
    if not path or not path.exists():
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            samples.append(json.loads(line))
        except ValueError:
            continue
    return [s for s in samples if "generation_tokens" in s]


def done_summary(run_dir: Path, iteration: int, stage: str) -> dict[str, Any]:
    where = run_dir / ("length_control" if stage == "length_control" else
                       "baseline" if iteration == 0 else f"iter_{iteration}")
    try:
        return json.loads((where / f"{stage}.done.json").read_text(encoding="utf-8")).get("summary") or {}
    except (OSError, ValueError):
        return {}


def counter_at(samples: list[dict[str, float]], t: float) -> float | None:
    """The server's generated-token counter at time t (the last sample at or before it)."""
    before = [s["generation_tokens"] for s in samples if s["at"] <= t]
    return before[-1] if before else (samples[0]["generation_tokens"] if samples else None)


def busy_intervals(samples: list[dict[str, float]]) -> list[tuple[float, float]]:
    """Intervals between consecutive samples in which the server generated tokens."""
    busy = []
    for a, b in zip(samples, samples[1:]):
        if b["generation_tokens"] > a["generation_tokens"]:
            if busy and abs(busy[-1][1] - a["at"]) < 1e-6:
                busy[-1] = (busy[-1][0], b["at"])
            else:
                busy.append((a["at"], b["at"]))
    return busy


def overlap(intervals: list[tuple[float, float]], t0: float, t1: float) -> float:
    return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in intervals)


def engine_lane(events: list[dict[str, Any]], samples: list[dict[str, float]], end: float) -> list[list[Any]]:
    """[t0, t1, kind] with kind start (an engine starting), up (started, not generating), generating, asleep."""
    lane: list[list[Any]] = []
    up_since: dict[Any, float] = {}
    asleep_since = None
    for e in events:
        kind, at = e.get("event"), e["at"]
        if kind in STARTS:
            lane.append([at - float(e.get("start_s") or 0.0), at, "start"])
            up_since[e.get("pid")] = at
        elif kind == "closed":
            since = up_since.pop(e.get("pid"), at - float(e.get("generate_s") or 0.0))
            lane.append([since, at, "up"])
            if e.get("generate_s"):  # in-process engines generate in one call per batch: shown as one block
                lane.append([at - float(e["generate_s"]), at, "generating"])
        elif kind == "server_stop":
            for pid in list(up_since):
                lane.append([up_since.pop(pid), at, "up"])
        elif kind == "sleep":
            asleep_since = at - float(e.get("seconds") or 0.0)
        elif kind == "wake" and asleep_since is not None:
            lane.append([asleep_since, at, "asleep"])
            asleep_since = None
    for since in up_since.values():  # still up when the log ends (a run stopped, or no server_stop written)
        lane.append([since, end, "up"])
    if asleep_since is not None:
        lane.append([asleep_since, end, "asleep"])
    lane += [[a, b, "generating"] for a, b in busy_intervals(samples)]
    return sorted(lane, key=lambda x: (x[0], x[1]))


def rows_of_run(run_dir: str | Path, variant: str, metrics: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per stage that started, then the run's row (see the module's docstring)."""
    run_dir = Path(run_dir)
    run, stages = read_log(run_dir)
    events = read_events(run_dir)
    samples = read_metrics(Path(metrics) if metrics else None)
    now = max([run.get("finished", 0.0), run.get("last", 0.0)] + [e["at"] for e in events])
    rows = []
    training_lane = []
    for (iteration, stage), t in sorted(stages.items(), key=lambda kv: kv[1].get("executing", kv[1].get("start", 0))):
        t0 = t.get("executing", t.get("start"))
        if t0 is None:
            continue
        t1 = t.get("done", now)
        # a server started just before a stage is the run's; engine_timings' times are rounded to 0.1 s
        inside = [e for e in events if t0 <= e["at"] <= t1 + 0.1]
        starts = [e for e in inside if e.get("event") in STARTS]
        # an in-process engine's tokens (closed), or what the run's server generated for the stage (served)
        closed = [e for e in inside if e.get("event") in ("closed", "served")]
        row: dict[str, Any] = {
            "variant": variant, "stage": stage, "iteration": iteration,
            "status": "done" if "done" in t else "unfinished", "start": round(t0, 2), "end": round(t1, 2),
            "seconds": round(t1 - t0, 1), "kernel_s": round(t["start"] - t0, 1) if "start" in t else None,
            "engine_starts": len(starts), "engine_start_s": round(sum(float(e.get("start_s") or 0) for e in starts), 1)}
        if closed:
            row["generated_tokens"] = sum(int(e.get("generated_tokens") or 0) for e in closed)
            row["generate_s"] = round(sum(float(e.get("generate_s") or 0) for e in closed), 1)
        elif samples:
            a, b = counter_at(samples, t0), counter_at(samples, t1)
            row["generated_tokens"] = int(b - a) if a is not None and b is not None else None
            row["generate_s"] = round(overlap(busy_intervals(samples), t0, t1), 1)
        else:
            row["generated_tokens"], row["generate_s"] = (0, 0.0) if stage == "training" else (None, None)
        tokens = row["generated_tokens"]
        row["tokens_per_s"] = round(tokens / row["generate_s"]) if tokens and row["generate_s"] else None
        row["wall_tokens_per_s"] = round(tokens / row["seconds"]) if tokens and row["seconds"] else None
        summary = done_summary(run_dir, iteration, stage)
        if stage == "extensions" and summary:
            jobs, kept = summary.get("jobs"), summary.get("extensions")
            row.update(jobs=jobs, extensions=kept, accepted_share=round(kept / jobs, 4) if jobs else None)
        if stage == "training":
            adapters = [v for v in summary.values() if isinstance(v, dict) and "trained" in v]
            row["train_s"] = round(sum(float(a.get("seconds") or 0) for a in adapters), 1) if adapters else None
            row["steps"] = sum(int(a.get("steps") or 0) for a in adapters) if adapters else None
            training_lane.append([t.get("start", t0), t1, "training"])
        rows.append(row)
    start = run.get("started", rows[0]["start"] if rows else now)
    end = run.get("finished", now)
    starts = [e for e in events if e.get("event") in STARTS]
    generated = [r["generated_tokens"] for r in rows if r.get("generated_tokens")]
    rows.append({"variant": variant, "stage": "run", "iteration": None,
                 "status": "done" if "finished" in run else "unfinished", "start": round(start, 2),
                 "end": round(end, 2), "seconds": round(end - start, 1), "engine_starts": len(starts),
                 "engine_start_s": round(sum(float(e.get("start_s") or 0) for e in starts), 1),
                 "generated_tokens": sum(generated) if generated else None,
                 "events_skipped": sum(e.get("event") not in STARTS | {"closed", "served", "server_stop", "sleep", "wake"}
                                       for e in events),
                 "engine_lane": engine_lane(events, samples, end), "training_lane": training_lane})
    return rows


# ------------------------------------------------------------------------------------------------- running

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is on 127.0.0.1


def sample_metrics(run_dir: Path, out: Path, stop: threading.Event, every_s: float = 1.0) -> None:
    """While the run's server is up, append its /metrics counters (summed over label sets) to `out`."""
    while not stop.wait(every_s):
        try:
            url = json.loads((run_dir / "engine.json").read_text())["url"].rstrip("/")
            url = url[:-3] if url.endswith("/v1") else url
            with NO_PROXY.open(f"{url}/metrics", timeout=2) as response:
                text = response.read().decode()
        except (OSError, ValueError, KeyError):
            continue
        sample: dict[str, float] = {"at": round(time.time(), 2)}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in METRICS:
                try:
                    sample[METRICS[name]] = sample.get(METRICS[name], 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        if "generation_tokens" in sample:
            with out.open("a") as f:
                f.write(json.dumps(sample) + "\n")


def set_options(overrides: dict[str, Any]) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")]


def run_variant(name: str, code: Path, workdir: Path, recipe: Path, benchmark: str | None, extra: list[str],
                scale: dict[str, Any] = OVERRIDES) -> list[dict[str, Any]]:
    """`slkit run` of `recipe` at `scale` with `code` first on PYTHONPATH, in `workdir`; its rows."""
    bench_dir = workdir / "loop-bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"loop-{name}"
    overrides = {**scale, "run_name": run_name, **({"evaluation.benchmark": benchmark} if benchmark else {})}
    command = [sys.executable, "-m", "slkit", "run", str(recipe), *set_options(overrides), *extra, "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    run_dir = workdir / "runs" / run_name
    metrics = bench_dir / f"{name}.metrics.jsonl"
    stop = threading.Event()
    sampler = threading.Thread(target=sample_metrics, args=(run_dir, metrics, stop), daemon=True)
    sampler.start()
    print(f"[loop bench] {name}: {' '.join(command)}  (PYTHONPATH first: {code})", flush=True)
    with open(bench_dir / f"{name}.out", "a") as log:
        rc = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    stop.set()
    sampler.join()
    rows = rows_of_run(run_dir, name, metrics)
    print(f"[loop bench] {name}: exit {rc}, {rows[-1]['seconds']} s, {rows[-1]['engine_starts']} engine starts",
          flush=True)
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Put `rows` in `path`, replacing the rows of their variants that were there."""
    variants = {r["variant"] for r in rows}
    kept = [r for r in read_rows(path) if r["variant"] not in variants] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SMALL_FILES = ("slkit.log", "engine_timings.jsonl", "params.yaml", "environment.json", "params_changes.log",
               "engine.json")


def collect(workdir: Path, out: Path) -> Path:
    """Rows of every loop-* run under workdir/runs so far (unfinished ones too), and a tgz of the bench's files and
    each run's small files (logs, timings, summaries, params; the server log's first 250 and last 150 lines) in `out`."""
    bench_dir = workdir / "loop-bench"
    bench_dir.mkdir(parents=True, exist_ok=True)
    for run_dir in sorted((workdir / "runs").glob("loop-*")):
        name = run_dir.name[len("loop-"):]
        write_rows(bench_dir / "rows.jsonl", rows_of_run(run_dir, name, bench_dir / f"{name}.metrics.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "loop-bench.tgz"
    with tarfile.open(target, "w:gz") as tar:
        tar.add(bench_dir, arcname="loop-bench")
        for run_dir in sorted((workdir / "runs").glob("loop-*")):
            files = [run_dir / f for f in SMALL_FILES] + sorted(run_dir.glob("*/*.done.json"))
            files += sorted(run_dir.glob("*/progress.json"))
            for f in files:
                if f.is_file():
                    tar.add(f, arcname=f"runs/{f.relative_to(run_dir.parent)}")
            server_log = run_dir / "vllm_server.log"
            if server_log.is_file():
                tail = workdir / "loop-bench" / f"{run_dir.name}.vllm_server.tail.log"
                lines = server_log.read_text(errors="replace").splitlines()  # its start-up (head) and its end
                kept = lines if len(lines) <= 400 else [*lines[:250], f"[... {len(lines) - 400} lines ...]", *lines[-150:]]
                tail.write_text("\n".join(kept) + "\n")
                tar.add(tail, arcname=f"runs/{run_dir.name}/vllm_server.tail.log")
    print(f"{target}: {target.stat().st_size / 1e6:.2f} MB")
    return target


def prepare(before: str, dest: Path, longen: Path) -> None:
    """dest/before: `before`'s slkit, notebooks and params (git archive); dest/after: this working tree's slkit,
    notebooks, params, tools and bench; dest/after/data/LonGen.jsonl."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "before").mkdir(parents=True)
    archive = subprocess.run(["git", "archive", before, "slkit", "notebooks", "params"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest / "before")], input=archive, check=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for part in ("slkit", "notebooks", "params", "tools", "bench"):
        shutil.copytree(REPO / part, dest / "after" / part, ignore=ignore)
    (dest / "after" / "data").mkdir()
    shutil.copy(longen, dest / "after" / "data" / "LonGen.jsonl")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: before = {before}, after = this working tree, {size / 1e6:.1f} MB")


# ---------------------------------------------------------------------------------------------- reporting

def table(rows: list[dict[str, Any]], variants: tuple[str, ...] = ("before", "after")) -> str:
    """Stages as rows, the first and last of `variants` side by side with last / first ratios; then the issue's
    targets."""
    by = {(r["variant"], r["stage"], r["iteration"]): r for r in rows}
    keys = []
    for r in rows:
        if (r["stage"], r["iteration"]) not in keys and r["stage"] != "run":
            keys.append((r["stage"], r["iteration"]))
    keys.append(("run", None))
    a, b = variants[0], variants[-1]

    def cell(row, key, fmt="{:,}"):
        value = (row or {}).get(key)
        return "" if value is None else fmt.format(value)

    def ratio(x, y, key):
        u, v = (x or {}).get(key), (y or {}).get(key)
        return f"{v / u:.2f}x" if u and v is not None else ""

    lines = [f"| stage | seconds {a} | seconds {b} | {b}/{a} | engine starts {a} / {b} | generated tokens {a} / {b} "
             f"| tokens/s {a} / {b} | {b}/{a} |", "|---|---|---|---|---|---|---|---|"]
    for stage, iteration in keys:
        x, y = by.get((a, stage, iteration)), by.get((b, stage, iteration))
        name = stage if stage == "run" else f"{'baseline ' if iteration == 0 else ''}{stage}"
        lines.append(f"| {name} | {cell(x, 'seconds')} | {cell(y, 'seconds')} | {ratio(x, y, 'seconds')} | "
                     f"{cell(x, 'engine_starts')} / {cell(y, 'engine_starts')} | "
                     f"{cell(x, 'generated_tokens')} / {cell(y, 'generated_tokens')} | "
                     f"{cell(x, 'tokens_per_s')} / {cell(y, 'tokens_per_s')} | {ratio(x, y, 'tokens_per_s')} |")
    lines.append("")
    lines += targets(rows, a, b)
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]], a: str, b: str) -> list[str]:
    """The issue's four targets, each met or not (or not measurable from these rows)."""
    def get(variant, stage, key):
        found = [r.get(key) for r in rows if r["variant"] == variant and r["stage"] == stage]
        return found[-1] if found else None

    out = []
    seconds = get(b, "run", "seconds")
    out.append(f"- iteration in at most 4 minutes: {b} {seconds} s ({get(a, 'run', 'seconds')} s {a}): "
               + ("?" if seconds is None else "met" if seconds <= 240 else "missed"))
    starts = get(b, "run", "engine_starts")
    out.append(f"- one engine start per run: {b} {starts}: " + ("?" if starts is None else "met" if starts == 1
                                                                 else "missed"))
    ext, ev = get(b, "extensions", "tokens_per_s"), get(b, "evaluation", "tokens_per_s")
    share = ext / ev if ext and ev else None
    out.append(f"- extensions' tokens/s at least 80% of evaluation's: {b} {ext} / {ev}"
               + (f" = {share:.0%}: {'met' if share >= 0.8 else 'missed'}" if share else ": ?"))
    x, y = get(a, "extensions", "accepted_share"), get(b, "extensions", "accepted_share")
    out.append(f"- accepted extensions within 5 points of {a}: {a} {x}, {b} {y}"
               + (f": {'met' if abs(y - x) <= 0.05 else 'missed'}" if x is not None and y is not None else ": ?"))
    return out


LANE_COLOURS = {"start": "#e6862a", "up": "#c6dbef", "generating": "#2171b5", "asleep": "#9e9e9e",
                "training": "#41ab5d"}
STAGE_COLOURS = {"queries": "#8dd3c7", "drafts": "#ffffb3", "extensions": "#bebada", "training": "#b3de69",
                 "evaluation": "#80b1d3", "length_control": "#fdb462"}


def timeline(rows: list[dict[str, Any]], out: Path) -> Path:
    """Stages against time, with an engine lane and a training lane, one panel per variant (shared time axis,
    seconds from each run's start)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    runs = [r for r in rows if r["stage"] == "run"]
    fig = Figure(figsize=(11, 1.9 * len(runs) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs):
        t0 = run["start"]
        for r in rows:
            if r["variant"] == run["variant"] and r["stage"] != "run":
                ax.barh(2, r["end"] - r["start"], left=r["start"] - t0, height=0.7, edgecolor="black", linewidth=0.5,
                        color=STAGE_COLOURS.get(r["stage"], "#dddddd"))
                ax.text((r["start"] + r["end"]) / 2 - t0, 2, r["stage"].replace("_", " "), ha="center", va="center",
                        fontsize=7, rotation=90 if r["end"] - r["start"] < 0.06 * run["seconds"] else 0)
        for a, b, kind in run.get("engine_lane", []):
            ax.barh(1, b - a, left=a - t0, height=0.5 if kind == "generating" else 0.7,
                    color=LANE_COLOURS.get(kind, "#dddddd"))
        for a, b, _ in run.get("training_lane", []):
            ax.barh(0, b - a, left=a - t0, height=0.7, color=LANE_COLOURS["training"])
        ax.set_yticks([0, 1, 2], ["training", "engine", "stages"])
        unfinished = " (unfinished: it ends here)" if run.get("status") == "unfinished" else ""
        ax.set_title(f"{run['variant']}: {run['seconds'] / 60:.1f} min, {run['engine_starts']} engine start"
                     f"{'' if run['engine_starts'] == 1 else 's'}{unfinished}", loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds from the run's start")
    fig.legend(handles=[Patch(color=c, label=f"engine {k}" if k != "training" else k)
                        for k, c in LANE_COLOURS.items()], loc="outside lower center", ncol=5, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="both variants' code folders and LonGen, to carry to the GPU machine")
    p.add_argument("--before", default="2a7f7c2")
    p.add_argument("--dest", default=".loopbench")
    p.add_argument("--longen", default=next((str(d / "shared" / "data" / "LonGen.jsonl") for d in REPO.parents
                                             if (d / "shared" / "data" / "LonGen.jsonl").is_file()), None),
                   help="LonGen's jsonl (default: ../shared/data/LonGen.jsonl above this checkout)")
    p = sub.add_parser("run", help="slkit run per variant (NAME=CODE_DIR, in order), rows to WORKDIR/loop-bench")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=CODE_DIR")
    p.add_argument("--workdir", default=".")
    p.add_argument("--recipe", help=f"default: each variant's own {RECIPE}")
    p.add_argument("--benchmark", help="evaluation.benchmark (e.g. a LonGen.jsonl where the hub is out of reach)")
    p.add_argument("--scale", choices=["issue", "recipe"], default="issue",
                   help="issue: the recipe with OVERRIDES (issue 24's scale); recipe: as the recipe says (tests)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="[NAME:]KEY=VALUE",
                   help="one more override, for every variant or for NAME's only")
    p = sub.add_parser("rows", help="rows of one run directory")
    p.add_argument("run_dir")
    p.add_argument("--variant", required=True)
    p.add_argument("--metrics")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "loop-bench" / "rows.jsonl"))
    p = sub.add_parser("collect", help="rows of the loop-* runs so far and a tgz of their small files, into --out")
    p.add_argument("--workdir", default=".")
    p.add_argument("--out", required=True)
    for name in ("table", "timeline"):
        p = sub.add_parser(name)
        p.add_argument("rows", nargs="?", default=str(REPO / "docs" / "results" / "loop-bench" / "rows.jsonl"))
        if name == "timeline":
            p.add_argument("--out", default=str(REPO / "docs" / "results" / "loop-bench" / "timeline.png"))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if not args.longen:
            parser.error("prepare: no ../shared/data/LonGen.jsonl above this checkout: give --longen")
        prepare(args.before, Path(args.dest), Path(args.longen))
    elif args.command == "run":
        workdir = Path(args.workdir).resolve()
        variants = [v.split("=", 1) for v in args.variant]
        for name, code in variants:
            recipe = Path(args.recipe) if args.recipe else Path(code) / RECIPE  # each variant's own recipe
            extra = [a for e in args.extra if ":" not in e.split("=", 1)[0] or e.startswith(f"{name}:")
                     for a in ("--set", e.split(":", 1)[1] if ":" in e.split("=", 1)[0] else e)]
            rows = run_variant(name, Path(code).resolve(), workdir, recipe.resolve(), args.benchmark, extra,
                               OVERRIDES if args.scale == "issue" else {})
            write_rows(workdir / "loop-bench" / "rows.jsonl", rows)
        print(table(read_rows(workdir / "loop-bench" / "rows.jsonl"), tuple(n for n, _ in variants)))
    elif args.command == "rows":
        rows = rows_of_run(args.run_dir, args.variant, args.metrics)
        write_rows(Path(args.out), rows)
        print(f"{len(rows)} rows -> {args.out}")
    elif args.command == "collect":
        collect(Path(args.workdir).resolve(), Path(args.out))
    elif args.command == "table":
        rows = read_rows(args.rows)
        order = tuple(dict.fromkeys(r["variant"] for r in rows))  # as they ran, but before always left of after
        print(table(rows, ("before", "after") if set(order) == {"before", "after"} else order))
    else:
        print(timeline(read_rows(args.rows), Path(args.out)))


if __name__ == "__main__":
    main()
