"""How fast one iteration's adapters train at the same global batch, cut different ways (issue 24: training is
most of an iteration after the one-engine change).

    python bench/train_speed.py --shape qwen2.5-1.5b --out docs/results/train-speed/rows.jsonl   # the GPU machine
    python bench/train_speed.py --shape tiny-llama --samples 8 --median 40 --max-tokens 96 \\
        --configs 1x8 2x4+two --workdir /tmp/ts                                                   # CPU check (tests)

Random bf16 weights of the model's shape (bench/train_memory.py's SHAPES: no model to move to the GPU machine)
and `--samples` (prompt, completion) pairs whose token counts are drawn once (seeded) from a log-normal around
`--median` tokens, cut at `--max-tokens`: the 1.5B's training sets in the loop bench held 73 samples of 876
(Generator) and 1,341 (Extender) tokens on average. Each config trains one adapter with slkit's own path
(slkit.training.adapters.train_adapter, the growth recipe's training section, epochs as given) in a process of its
own, so each starts with the GPU empty:

    BxA        batch_size B, gradient_accumulation A (B x A = 8: the reference's global batch)
    BxA+ckpt   the same with gradient checkpointing
    BxA+group  the same with samples of like length batched together (training.group_by_length)
    BxA+two    two adapters trained at once (the Generator's and the Extender's, as the training stage could),
               in two processes side by side: the row's seconds are the pair's wall time
    BxA+prof   the same, with torch.profiler over optimizer steps 3-4: where a step's time goes (GPU kernels,
               CPU-side operators, GPU idle share) is written to --workdir/profile-<config>.txt

A row: config, samples, tokens, steps, seconds, tokens/s (both adapters' tokens for +two), peak GiB
(torch.cuda.max_memory_allocated of the process, the larger for +two) and speed-up over the first config.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rows import emit  # bench/ is not a package: its folder is on sys.path
from train_memory import SHAPES, build_checkpoint

RECIPE = REPO / "params" / "growth-qwen2.5-1.5b.yaml"
CONFIGS = ["1x8", "4x2", "8x1", "8x1+group", "8x1+ckpt+group", "1x8+two", "8x1+group+two"]


def parse_config(name: str) -> tuple[int, int, bool, bool, bool]:
    """(batch_size, gradient_accumulation, gradient checkpointing, two at once, grouped by length) of a name such
    as 4x2+ckpt."""
    base, *flags = name.split("+")
    sizes = base.split("x")
    if len(sizes) != 2 or not all(x.isdigit() and int(x) > 0 for x in sizes) or set(flags) - {"ckpt", "two", "group", "prof"}:
        raise SystemExit(f"--configs: {name!r} is not BxA[+ckpt][+group][+two][+prof] (B, A whole numbers from 1)")
    return int(sizes[0]), int(sizes[1]), "ckpt" in flags, "two" in flags, "group" in flags


def write_samples(path: Path, tokenizer, count: int, median: int, max_tokens: int, seed: int = 0) -> list[int]:
    """`count` pairs of about median x lognormal(0, 0.6) tokens each (at most max_tokens); returns the targets."""
    rng = random.Random(seed)
    words = (REPO / "slkit" / "core" / "exemplars" / "en.txt").read_text(encoding="utf-8").split()
    per_word = len(tokenizer(" ".join(words))["input_ids"]) / len(words)
    targets = [max(16, min(max_tokens, round(median * math.exp(rng.gauss(0, 0.6))))) for _ in range(count)]
    with path.open("w", encoding="utf-8") as f:
        for i, tokens in enumerate(targets):
            n = max(1, round(tokens / per_word))
            text = " ".join(words[(i + j) % len(words)] for j in range(n))
            f.write(json.dumps({"prompt": f"Write request {i}.", "completion": text}) + "\n")
    return targets


PROFILED_STEPS = (3, 5)  # optimizer steps [3, 5): past the first ones' kernel autotuning and allocator growth


def profile_callback(path: Path):
    """A TrainerCallback that profiles PROFILED_STEPS and writes two tables and the GPU's busy share to `path`."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class ProfileSteps(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == PROFILED_STEPS[0]:
                sync()
                self.start = time.perf_counter()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is None or state.global_step != PROFILED_STEPS[1]:
                return
            sync()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not operators
            gpu = sum(e.self_device_time_total for e in on_gpu) / 1e6
            kernels = sum(e.count for e in on_gpu)
            text = (f"steps {PROFILED_STEPS[0]}-{PROFILED_STEPS[1] - 1}: wall {wall:.2f} s, GPU busy {gpu:.2f} s "
                    f"({gpu / wall:.0%}), {kernels} kernels\n\n"
                    + events.table(sort_by="self_device_time_total", row_limit=30) + "\n\n"
                    + events.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
            path.write_text(text)
            print(text.splitlines()[0], flush=True)
            self.prof = None

    return ProfileSteps()


def child(args: argparse.Namespace) -> None:
    """Train one adapter with one config; print its summary as a ROW line."""
    import torch

    import slkit.training.adapters as adapters
    from slkit.core.params import load_params
    from slkit.training.adapters import train_adapter

    if "+prof" in args.child:
        trainer_of = adapters.sft_trainer

        def profiled_trainer(*a, **k):
            trainer, timer = trainer_of(*a, **k)
            trainer.add_callback(profile_callback(Path(args.adapter).parent / f"profile-{args.child}.txt"))
            return trainer, timer

        adapters.sft_trainer = profiled_trainer

    batch, accumulation, ckpt, _, group = parse_config(args.child)
    params = load_params(RECIPE, {
        "model.path": str(args.model_dir), "training.batch_size": batch, "training.gradient_accumulation": accumulation,
        "training.gradient_checkpointing": ckpt, "training.group_by_length": group, "training.epochs": args.epochs, "training.save_steps": 0,
        "training.max_length": args.max_tokens + 64})
    summary = train_adapter(params, args.data, Path(args.adapter))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    print("ROW " + json.dumps({"steps": summary["steps"], "seconds": summary["seconds"], "tokens": summary["tokens"],
                               "samples": summary["samples"], "peak_gib": peak and round(peak, 2)}), flush=True)


def run_config(name: str, model_dir: Path, data: Path, args: argparse.Namespace, workdir: Path) -> dict:
    """One config's row; an out-of-memory or other failure is a row with its reason."""
    two = parse_config(name)[3]
    command = [sys.executable, __file__, "--child", name, "--model-dir", str(model_dir), "--data", str(data),
               "--epochs", str(args.epochs), "--max-tokens", str(args.max_tokens)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, "--adapter", str(workdir / f"adapter-{name}-{k}")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2 if two else 1)]
    outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    wall = time.perf_counter() - start
    rows = [json.loads(line[4:]) for out in outputs for line in out.splitlines() if line.startswith("ROW ")]
    if len(rows) != len(procs):
        tail = " | ".join(outputs[-1].strip().splitlines()[-3:])
        why = "out of memory" if "out of memory" in "".join(outputs).lower() else tail[-300:]
        return {"config": name, "error": why}
    tokens = sum(r["tokens"] for r in rows)
    seconds = round(wall, 1) if two else rows[0]["seconds"]
    peaks = [r["peak_gib"] for r in rows if r["peak_gib"] is not None]
    return {"config": name, "samples": rows[0]["samples"], "tokens": tokens, "steps": rows[0]["steps"],
            "seconds": seconds, "tokens_per_s": round(tokens / seconds) if seconds else None,
            "peak_gib": max(peaks) if peaks else None}


def table(rows: list[dict]) -> str:
    first = next((r for r in rows if "error" not in r), None)
    lines = ["| config | samples | tokens | steps | seconds | tokens/s | peak GiB | tokens/s vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x" if first and first["tokens_per_s"] else ""
        lines.append(f"| {r['config']} | {r['samples']} | {r['tokens']:,} | {r['steps']} | {r['seconds']} | "
                     f"{r['tokens_per_s']:,} | {r['peak_gib'] if r['peak_gib'] is not None else ''} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--samples", type=int, default=73)
    parser.add_argument("--median", type=int, default=900, help="median tokens of a sample")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--workdir", default="/tmp/slkit-train-speed")
    parser.add_argument("--out", help="rows as jsonl (appended as they come)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a config may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--data", "--adapter"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    for name in args.configs:
        parse_config(name)
    from transformers import AutoTokenizer  # after the check: a bad --configs fails before the imports

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_checkpoint(args.shape, workdir)
    data = workdir / "samples.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    targets = write_samples(data, tokenizer, args.samples, args.median, args.max_tokens)
    print(f"{args.shape}: {args.samples} samples, median {sorted(targets)[len(targets) // 2]} tokens, "
          f"max {max(targets)}; {args.epochs:g} epoch(s)", flush=True)
    rows = []
    for name in args.configs:
        row = {"shape": args.shape, **run_config(name, model_dir, data, args, workdir)}
        rows.append(row)
        emit(row, args.out)
    print(table(rows))


if __name__ == "__main__":
    main()
