"""bench/loop.py on a tiny real run: `run` drives `slkit run` with the variant's code first on PYTHONPATH and
reads one row per stage from what the run left; the engine events of the GPU paths (in-process engines, the run's
server, its sleep and wake, events it does not know) are attributed to the stages they fall in."""
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import loop  # noqa: E402

pytestmark = pytest.mark.slow  # runs scripts, pipelines or processes: the full suite, not `make test-fast`

STAGES = ["queries", "drafts", "extensions", "training", "evaluation"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_path):
    """One macro-iteration of the smoke recipe through `loop.py run` (variant "now": this checkout)."""
    workdir = tmp_path_factory.mktemp("loopbench")
    out = subprocess.run(
        [sys.executable, "bench/loop.py", "run", "--variant", f"now={REPO}", "--workdir", str(workdir),
         "--recipe", "params/smoke.yaml", "--scale", "recipe",
         "--benchmark", str(REPO / "tests" / "fixtures" / "longen_mini.jsonl"),
         "--set", "macro_iterations=1", "--set", "length_control.enabled=false", "--set", "evaluation.baseline=false",
         "--set", "other:engine.batch_size=3"],  # another variant's override: not given to this one
        capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return workdir, out.stdout


def test_run_writes_a_row_per_stage_from_the_runs_files(bench_run):
    workdir, stdout = bench_run
    run_dir = workdir / "runs" / "loop-now"
    params = yaml.safe_load((run_dir / "params.yaml").read_text())
    assert params["engine"]["batch_size"] == 16 and params["macro_iterations"] == 1  # other's override: not here
    rows = loop.read_rows(workdir / "loop-bench" / "rows.jsonl")
    assert [r["stage"] for r in rows] == STAGES + ["run"] and {r["variant"] for r in rows} == {"now"}
    for r in rows[:-1]:
        assert r["status"] == "done" and r["iteration"] == 1 and r["seconds"] > r["kernel_s"] > 0
        assert r["end"] - r["start"] == pytest.approx(r["seconds"], abs=0.1)
        assert r["engine_starts"] == 0  # the transformers engine writes no engine timings
    assert all(a["end"] <= b["start"] for a, b in zip(rows, rows[1:-1]))  # stages one after the other
    extensions = json.loads((run_dir / "iter_1" / "extensions.done.json").read_text())["summary"]
    ext = rows[2]
    assert (ext["jobs"], ext["extensions"]) == (extensions["jobs"], extensions["extensions"])
    assert ext["accepted_share"] == pytest.approx(extensions["extensions"] / extensions["jobs"], abs=1e-4)
    training = json.loads((run_dir / "iter_1" / "training.done.json").read_text())["summary"]
    assert rows[3]["steps"] == sum(training[r]["steps"] or 0 for r in ("generator", "extender"))
    run = rows[-1]
    assert run["status"] == "done" and run["seconds"] >= sum(r["seconds"] for r in rows[:-1])
    assert run["training_lane"] and run["engine_lane"] == []
    assert "| extensions |" in stdout and "one engine start per run" in stdout


def test_engine_events_and_server_metrics_are_attributed_to_their_stages(bench_run, tmp_path):
    """The GPU paths' events, written into the tiny run where they would fall: a server started before the first
    stage, asleep during training; an in-process engine's ready/closed in extensions; a torn line and an event
    this bench does not know (skipped); the server's token counter growing during the evaluation."""
    workdir, _ = bench_run
    rows = {r["stage"]: r for r in loop.read_rows(workdir / "loop-bench" / "rows.jsonl")}
    run_dir = workdir / "runs" / "loop-now"
    ext, train, ev, run = rows["extensions"], rows["training"], rows["evaluation"], rows["run"]
    events = [
        {"event": "server_start", "at": rows["queries"]["start"] - 2, "pid": 7, "start_s": 30.0, "url": "http://x"},
        {"event": "ready", "at": ext["start"] + 3, "pid": 8, "start_s": 2.5},
        # engine_timings rounds to 0.1 s: an engine closed as its stage ended may read a little after the end
        {"event": "closed", "at": ext["end"] + 0.04, "pid": 8, "start_s": 2.5, "generate_s": 4.0, "requests": 9,
         "generated_tokens": 1200},
        # the drafts stage's engine on the run's server: what the server generated while it was open
        {"event": "served", "at": rows["drafts"]["end"] - 0.5, "pid": 9, "generate_s": 5.0, "generated_tokens": 2500},
        {"event": "sleep", "at": train["start"] + 1, "pid": 7, "seconds": 0.5, "reason": "training"},
        {"event": "wake", "at": train["end"] - 1, "pid": 7, "seconds": 0.2},
        {"event": "compile_cache_hit", "at": ev["start"] + 1, "pid": 7},
        {"event": "server_stop", "at": run["end"] - 0.5, "pid": 7, "reason": "run finished"},
    ]
    (run_dir / "engine_timings.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "rea')
    metrics = tmp_path / "now.metrics.jsonl"
    t0, t1 = ev["start"], ev["end"]
    samples = [{"at": t0 - 5, "generation_tokens": 100}, {"at": t0 + 1, "generation_tokens": 100},
               {"at": t0 + 2, "generation_tokens": 600}, {"at": t0 + 3, "generation_tokens": 1100},
               {"at": t1 + 5, "generation_tokens": 1100}]
    metrics.write_text("".join(json.dumps(s) + "\n" for s in samples) + "not json\n")

    got = {r["stage"]: r for r in loop.rows_of_run(run_dir, "after", metrics)}
    assert got["queries"]["engine_starts"] == 0  # the server started before the first stage: the run's row has it
    assert (got["extensions"]["engine_starts"], got["extensions"]["generated_tokens"]) == (1, 1200)
    assert got["extensions"]["generate_s"] == 4.0 and got["extensions"]["tokens_per_s"] == 300
    assert (got["evaluation"]["generated_tokens"], got["evaluation"]["generate_s"]) == (1000, 2.0)
    assert got["evaluation"]["tokens_per_s"] == 500
    assert got["run"]["engine_starts"] == 2 and got["run"]["engine_start_s"] == 32.5
    assert (got["drafts"]["generated_tokens"], got["drafts"]["tokens_per_s"]) == (2500, 500)
    assert got["run"]["events_skipped"] == 1 and got["run"]["generated_tokens"] == 4700
    kinds = {kind for _, _, kind in got["run"]["engine_lane"]}
    assert kinds == {"start", "up", "generating", "asleep"}
    asleep = [(a, b) for a, b, kind in got["run"]["engine_lane"] if kind == "asleep"]
    assert asleep == [(pytest.approx(train["start"] + 0.5), pytest.approx(train["end"] - 1))]

    before = [dict(r, variant="before") for r in rows.values()]
    before[2]["accepted_share"] = (got["extensions"].get("accepted_share") or 0) + 0.1
    text = loop.table(before + list(got.values()))
    assert "| extensions |" in text and "| run |" in text
    assert "accepted extensions within 5 points of before" in text and ": missed" in text
    assert "one engine start per run: after 2: missed" in text
    png = loop.timeline(before + list(got.values()), tmp_path / "timeline.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_collect_bundles_rows_and_the_runs_small_files(bench_run, tmp_path):
    workdir, _ = bench_run
    (workdir / "runs" / "loop-now" / "vllm_server.log").write_text("".join(f"line {i}\n" for i in range(1000)))
    target = loop.collect(workdir, tmp_path / "out")
    with tarfile.open(target) as tar:
        names = set(tar.getnames())
        tail = tar.extractfile("runs/loop-now/vllm_server.tail.log").read().decode().splitlines()
    assert {"loop-bench/rows.jsonl", "runs/loop-now/slkit.log", "runs/loop-now/params.yaml",
            "runs/loop-now/iter_1/extensions.done.json"} <= names
    # the start-up lines (why a start is slow) and the end (why it stopped), not the 600 between
    assert tail[:2] == ["line 0", "line 1"] and tail[249:252] == ["line 249", "[... 600 lines ...]", "line 850"]
    assert tail[-1] == "line 999" and len(tail) == 401
    assert not any(n.endswith(".jsonl") and "iter_1" in n for n in names)  # records stay on the machine


def test_prepare_makes_both_code_folders(tmp_path):
    loop.prepare("HEAD", tmp_path / "lb", REPO / "tests" / "fixtures" / "longen_mini.jsonl")
    for variant in ("before", "after"):
        assert (tmp_path / "lb" / variant / "slkit" / "running" / "pipeline.py").is_file()
        assert (tmp_path / "lb" / variant / "notebooks" / "00_queries.ipynb").is_file()
    assert (tmp_path / "lb" / "after" / "tools" / "device" / "offline.sh").is_file()
    assert (tmp_path / "lb" / "after" / "bench" / "loop.py").is_file()
    assert (tmp_path / "lb" / "after" / "data" / "LonGen.jsonl").is_file()


def test_offline_sh_starts_the_bench_detached_and_collects(tmp_path):
    """tools/device/offline.sh loop-bench starts $W/code/bench/loop.py run detached (pid in run.pid, output in
    run.log), watch waits for it, loop-collect calls its collect into OUT (a stub loop.py here)."""
    w = tmp_path / "w"
    (w / "code" / "bench").mkdir(parents=True)
    (w / "code" / "bench" / "loop.py").write_text(
        "import sys, time, pathlib\n"
        "if sys.argv[1] == 'run':\n    time.sleep(3)\n    print('ran', ' '.join(sys.argv[2:]))\n"
        "else:\n    out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        "    (out / 'loop-bench.tgz').write_text(' '.join(sys.argv[1:]))\n")
    script = str(REPO / "tools" / "device" / "offline.sh")
    env = {"SLKIT_OFFLINE": str(w), "SLKIT_PREFLIGHT_IMPORTS": "json", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}

    def sh(*args, check=True):
        out = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 or not check, out.stdout + out.stderr
        return out.stdout

    assert "started pid" in sh("loop-bench", "--variant", "before=/x", "--benchmark", "/b.jsonl")
    assert "already running" in sh("loop-bench", "--variant", "again=/y")  # one run at a time
    assert "run: ended" in sh("watch", "60", check=False)  # its last line asks nvidia-smi: none here
    assert f"ran --workdir {w} --variant before=/x --benchmark /b.jsonl" in (w / "run.log").read_text()
    env["SLKIT_PREFLIGHT_IMPORTS"] = "no_such_module_here"
    assert "No module named" in sh("loop-bench", "--variant", "x=/x", check=False)  # refused before it starts
    assert "x=/x" not in (w / "run.log").read_text()
    sh("loop-collect", str(tmp_path / "out"))
    assert (tmp_path / "out" / "loop-bench.tgz").read_text() == f"collect --workdir {w} --out {tmp_path / 'out'}"
    assert (tmp_path / "out" / "run.log").exists()


def test_the_servers_metrics_are_sampled_from_the_url_engine_json_names(tmp_path):
    """The run's server (runs/<run>/engine.json: url, with or without /v1): its Prometheus counters summed over
    label sets (data-parallel engines), other metrics left out; nothing while engine.json is absent."""
    import http.server
    import threading
    import time

    text = (b'# HELP vllm:generation_tokens_total tokens\nvllm:generation_tokens_total{engine="0",model_name="m"} 120.0\n'
            b'vllm:generation_tokens_total{engine="1",model_name="m"} 30.0\nvllm:num_requests_running{engine="0"} 4.0\n'
            b'vllm:generation_tokens_created{engine="0"} 1.7e9\n')

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out, stop = tmp_path / "m.jsonl", threading.Event()
    sampler = threading.Thread(target=loop.sample_metrics, args=(tmp_path, out, stop, 0.1))
    sampler.start()
    time.sleep(0.5)
    assert not out.exists()
    (tmp_path / "engine.json").write_text(json.dumps({"url": f"http://127.0.0.1:{server.server_port}/v1"}))
    time.sleep(0.8)
    stop.set()
    sampler.join()
    server.shutdown()
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert samples and all(set(s) == {"at", "generation_tokens", "running"} for s in samples)
    assert samples[0]["generation_tokens"] == 150.0 and samples[0]["running"] == 4.0
