"""Where the run's `vllm serve` spends its start (issue 24: 140-174 s to /health on the H200, for a 4-layer model
as for the 1.5B, against ~70 s for vLLM in one process).

    python bench/engine_start.py --shape qwen2.5-1.5b --variants cold=a warm=a hostip=b,VLLM_HOST_IP=127.0.0.1 \\
        --workdir /tmp/es --out docs/results/engine-start/rows.jsonl                    # the GPU machine

Each variant starts the growth recipe's server exactly as `slkit run` does (slkit.engines.server.ManagedServer:
the same command, environment and guard) on random weights of `--shape` (bench/train_memory.py's checkpoints),
waits for /health, and stops it. A variant is NAME=CACHE[,KEY=VALUE...]: CACHE names vLLM's cache folder
(VLLM_CACHE_ROOT, under --workdir: a variant that reuses an earlier one's finds its torch.compile artefacts), the
KEY=VALUEs are environment variables for the server.

Every Python process of the server samples its own stacks (a sitecustomize.py put first on the server's
PYTHONPATH: a thread dumps all threads with faulthandler every --interval seconds into stacks/<variant>/<pid>.txt,
each dump headed by its seconds since the server started). The table gives, per variant, the seconds to /health
and the main thread's longest stretches: consecutive samples in the same vLLM/torch/transformers function. The
raw samples stay under --workdir for a closer look.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rows import emit  # bench/ is not a package: its folder is on sys.path
from train_memory import SHAPES, build_checkpoint

RECIPE = REPO / "params" / "growth-qwen2.5-1.5b.yaml"

SAMPLER = '''"""Written by bench/engine_start.py: sample this process's stacks into $SLKIT_STACKS_DIR/<pid>.txt."""
import faulthandler, os, threading, time


def _sample(folder, interval, t0):
    with open(os.path.join(folder, f"{os.getpid()}.txt"), "w", buffering=1) as out:
        cmd = open("/proc/self/cmdline", "rb").read().replace(b"\\0", b" ").decode(errors="replace")
        out.write(f"cmdline {cmd[:400]}\\n")
        while True:
            time.sleep(interval)
            out.write(f"=== {time.time() - t0:.1f}\\n")
            faulthandler.dump_traceback(out, all_threads=True)


if os.environ.get("SLKIT_STACKS_DIR"):
    threading.Thread(target=_sample, daemon=True, name="slkit-stack-sampler",
                     args=(os.environ["SLKIT_STACKS_DIR"], float(os.environ.get("SLKIT_STACKS_INTERVAL", "2")),
                           float(os.environ["SLKIT_STACKS_T0"]))).start()
'''

FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')
IDLE = {"wait", "select", "poll", "_recv", "recv", "recv_into", "accept", "get", "sleep", "_sample", "run_forever",
        "_wait_for_tstate_lock", "_worker", "_run_once", "dump_traceback", "readinto", "read"}
KEY_PARTS = ("/vllm/", "/torch/", "/transformers/", "/triton/", "/huggingface_hub/", "/safetensors/")


def parse_samples(text: str) -> list[tuple[float, list[list[tuple[str, str]]]]]:
    """(seconds, threads) per dump; a thread is its frames innermost first, each (short file, function)."""
    samples = []
    for block in text.split("=== ")[1:]:
        head, _, body = block.partition("\n")
        threads: list[list[tuple[str, str]]] = []
        for line in body.splitlines():
            if line.startswith(("Thread 0x", "Current thread 0x")):
                threads.append([])
            elif threads and (m := FRAME.match(line)):
                short = next((m["file"][m["file"].rfind(part) + 1:] for part in KEY_PARTS if part in m["file"]),
                             Path(m["file"]).name)
                threads[-1].append((f"{short}:{m['line']}", m["func"]))
        samples.append((float(head), threads))
    return samples


def busy_frame(threads: list[list[tuple[str, str]]]) -> str:
    """What the process was doing in one dump: the main thread's (faulthandler lists it last) innermost frame
    in vLLM, torch, transformers or triton, under its innermost frame when that differs."""
    if not threads:
        return "?"
    frames = threads[-1]
    if not frames:
        return "?"
    inner = f"{frames[0][1]} ({frames[0][0]})"
    key = next((f"{func} ({where})" for where, func in frames if where.startswith(tuple(p[1:] for p in KEY_PARTS))),
               None)
    return inner if key is None or key == inner else f"{key} > {frames[0][1]}"


def stretches(samples, interval: float, top: int = 8) -> list[dict]:
    """The longest runs of consecutive dumps with the same busy frame: [{from_s, seconds, frame}]."""
    runs: list[dict] = []
    for seconds, threads in samples:
        frame = busy_frame(threads)
        if runs and runs[-1]["frame"] == frame:
            runs[-1]["seconds"] = round(seconds - runs[-1]["from_s"] + interval, 1)
        else:
            runs.append({"from_s": round(seconds - interval, 1), "seconds": interval, "frame": frame})
    return sorted(runs, key=lambda r: -r["seconds"])[:top]


def summarise(folder: Path, interval: float) -> list[dict]:
    """Per sampled process: the head of its command line and its longest stretches."""
    out = []
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(errors="replace")
        cmd = text.partition("\n")[0].removeprefix("cmdline ")
        samples = parse_samples(text)
        if samples:
            out.append({"pid": int(path.stem), "cmd": cmd[:160], "samples": len(samples),
                        "stretches": stretches(samples, interval)})
    return out


def start_once(name: str, spec: str, model_dir: Path, args: argparse.Namespace, workdir: Path) -> dict:
    from slkit.core.params import load_params
    from slkit.engines.server import ManagedServer

    cache, *pairs = spec.split(",")
    env = dict(pair.split("=", 1) for pair in pairs)
    stacks = workdir / "stacks" / name
    stacks.mkdir(parents=True, exist_ok=True)
    (workdir / "runs" / name).mkdir(parents=True, exist_ok=True)
    saved = dict(os.environ)
    os.environ.update(env, VLLM_CACHE_ROOT=str(workdir / "cache" / cache), SLKIT_STACKS_DIR=str(stacks),
                      SLKIT_STACKS_INTERVAL=str(args.interval), SLKIT_STACKS_T0=str(time.time()),
                      PYTHONPATH=os.pathsep.join(filter(None, [str(workdir / "sampler"), str(REPO),
                                                               os.environ.get("PYTHONPATH")])))
    params = load_params(RECIPE, {"model.path": str(model_dir), "run_name": name, "output_dir": str(workdir / "runs")})
    server = ManagedServer(params, params.run_dir)
    try:
        started = time.monotonic()
        server.start()
        start_s = round(time.monotonic() - started, 1)
    except Exception as err:  # a start that fails is a row with its reason
        return {"variant": name, "env": env, "cache": cache, "error": str(err)[-600:]}
    finally:
        server.stop("bench")
        os.environ.clear()
        os.environ.update(saved)
    return {"variant": name, "env": env, "cache": cache, "start_s": start_s,
            "vllm_env": {k: v for k, v in saved.items() if k.startswith("VLLM_")},
            "processes": summarise(stacks, args.interval)}


def table(rows: list[dict]) -> str:
    lines = ["| variant | cache | env | seconds to /health | longest stretches of the main threads |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['cache']} | {r['env']} | failed: {r['error'][-200:]} | |")
            continue
        top = sorted((s | {"pid": p["pid"]} for p in r["processes"] for s in p["stretches"]),
                     key=lambda s: -s["seconds"])[:6]
        where = "<br>".join(f"{s['seconds']:g} s from {s['from_s']:g} s (pid {s['pid']}): {s['frame']}" for s in top)
        lines.append(f"| {r['variant']} | {r['cache']} | {r['env'] or ''} | {r['start_s']} | {where} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", help="a model folder to serve instead of random weights of --shape")
    parser.add_argument("--variants", nargs="+", default=["cold=a", "warm=a"])
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between stack samples")
    parser.add_argument("--workdir", default="/tmp/slkit-engine-start")
    parser.add_argument("--out", help="rows as jsonl (appended as they come)")
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variants]
    if any(len(v) != 2 or not v[1] for v in variants):
        raise SystemExit("--variants: each is NAME=CACHE[,KEY=VALUE...]")
    workdir = Path(args.workdir)
    (workdir / "sampler").mkdir(parents=True, exist_ok=True)
    (workdir / "sampler" / "sitecustomize.py").write_text(SAMPLER)
    model_dir = Path(args.model_dir) if args.model_dir else build_checkpoint(args.shape, workdir)
    rows = []
    for name, spec in variants:
        row = start_once(name, spec, model_dir, args, workdir)
        rows.append(row)
        emit(row, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
