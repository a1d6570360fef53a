"""slkit's small-card mode on one big GPU under a 24 GiB cap: the run's `vllm serve` sleeps while a QLoRA adapter
trains, and wakes after (issue 24, item 2).

On the GPU machine, from the repo root of a copy of this branch (offline.sh's environment: vLLM in /tmp/vsite, the
converted builtin:qwen2.5-coder-1.5b-instruct in $SLKIT_CACHE/models/ for its tokenizer):

    SLKIT_CACHE=/tmp/slkit-offline/cache PYTHONPATH=$PWD:/tmp/slkit-offline/site:/tmp/vsite \\
      VLLM_ATTENTION_BACKEND=FLASH_ATTN VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false \\
      python3 bench/small_card.py --workdir /tmp/smallcard --out docs/results/small-card/rows.jsonl
    python bench/small_card.py --dry-run        # CPU: the commands and settings, nothing started (tests run it)

What runs, in order (each GPU step in a process of its own, so each frees its memory when it ends):
1. the model: the Qwen2-7B shape (bench/train_memory.py's SHAPES["qwen2-7b"]) with random bf16 weights and the
   tokenizer of the converted Qwen2.5 1.5B builtin (the same vocabulary), saved once under --workdir (~15 GiB).
2. the server: slkit's own managed_server(params, run_dir) with params/qwen2.5-7b-24gb.yaml, unchanged but for
   model.path, engine.vllm.gpu_memory_utilization = --engine-gib / the card's memory, and
   engine.vllm.sleep_during_training: always (auto would not sleep at a share below 0.5). The server loads the
   random checkpoint with the recipe's bitsandbytes 4-bit quantization. Not `--load-format dummy`: vLLM forces
   the bitsandbytes loader whenever quantization is bitsandbytes (EngineArgs.create_load_config), and without
   quantization the 7B shape's bf16 weights (~15 GiB) would not fit a ~14 GiB share. So no slkit change is needed.
3. a greedy completion (temperature 0, ignore_eos, --new-tokens tokens) before the sleep.
4. asleep_for_training(params, run_dir, "small-card"): /sleep?level=1, then the training child: slkit's
   train_adapter with the same recipe (rank 16 as train_memory.py's rows, --samples samples of --length tokens)
   and training.gpu_memory_fraction = (--cap-gib - what the asleep server still holds) / the card's memory;
   /wake_up when it ends (an OOM of the child is a row, not a crash).
5. the same greedy completion after the wake: it must equal the one before the sleep.

Memory: torch.cuda.mem_get_info on the device, polled every 0.2 s during training (its peak), as GiB in use net
of this script's own CUDA context (measured before anything starts; a real `slkit run` holds none); the training
child's torch.cuda.max_memory_allocated. The per-process fraction caps only torch's caching allocator: the child's
CUDA context and bitsandbytes' paged optimizer states (managed memory) are outside it, so the training phase's
device peak is the figure to hold against --cap-gib. Seconds of start, sleep and wake come from the run's
engine_timings.jsonl (slkit's own log of them).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_memory import LORA, RECIPE, SHAPES, write_samples  # light: no torch at import

SHAPE = "qwen2-7b"
TOKENIZER_BUILTIN = "qwen2.5-coder-1.5b-instruct"
PHASES = ("server up", "asleep", "training", "awake")
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/smallcard"))
    p.add_argument("--out", type=Path, help="append the rows (jsonl) here")
    p.add_argument("--tokenizer-from", type=Path, default=None,
                   help=f"a model directory whose tokenizer to use (default: $SLKIT_CACHE/models/{TOKENIZER_BUILTIN})")
    p.add_argument("--cap-gib", type=float, default=24.0, help="the small card's memory")
    p.add_argument("--engine-gib", type=float, default=14.0, help="the server's share, GiB of the card")
    p.add_argument("--max-model-len", type=int, default=32768, help="the recipe's; lower it if the KV cache won't fit")
    p.add_argument("--length", type=int, default=4096, help="tokens of each training sample")
    p.add_argument("--samples", type=int, default=2, help="training samples (one optimizer step each)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens of the greedy completion")
    p.add_argument("--start-timeout", type=float, default=420.0, help="engine.vllm.start_timeout_s")
    p.add_argument("--total-gib", type=float, default=140.0, help="--dry-run only: the card's memory to assume")
    p.add_argument("--dry-run", action="store_true", help="print the commands and settings; start nothing")
    p.add_argument("--child", choices=("build", "train"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokenizer_from is None:
        from slkit.models.builtin import cache_dir

        args.tokenizer_from = cache_dir() / "models" / TOKENIZER_BUILTIN
    return args


# Settings


def engine_share(engine_gib: float, total_gib: float) -> float:
    """engine.vllm.gpu_memory_utilization that gives the server `engine_gib` of a `total_gib` card."""
    return round(engine_gib / total_gib, 4)


def training_fraction(cap_gib: float, asleep_gib: float, total_gib: float) -> float:
    """training.gpu_memory_fraction: what the cap leaves beside the asleep server, as a share of the card."""
    left = cap_gib - asleep_gib
    if left <= 0:
        raise ValueError(f"the asleep server holds {asleep_gib:.2f} GiB: nothing left of the {cap_gib:g} GiB cap")
    return round(left / total_gib, 4)


def server_overrides(args: argparse.Namespace, model_dir: Path, total_gib: float) -> dict:
    return {"model.path": str(model_dir), "run_name": "small-card", "macro_iterations": 1,
            "engine.vllm.server": True, "engine.vllm.gpu_memory_utilization": engine_share(args.engine_gib, total_gib),
            "engine.vllm.sleep_during_training": "always", "engine.vllm.max_model_len": args.max_model_len,
            "engine.vllm.start_timeout_s": args.start_timeout, "training.lora_r": LORA["training.lora_r"]}


def train_overrides(args: argparse.Namespace, model_dir: Path, fraction: float) -> dict:
    """train_memory.py's slkit variant (one sample per step, rank 16), capped at `fraction` of the card."""
    return {"model.path": str(model_dir), "training.max_length": args.length, "training.epochs": 1.0,
            "training.warmup_ratio": 0.0, "training.gradient_accumulation": 1, "training.save_steps": 0,
            **LORA, "training.gpu_memory_fraction": fraction}


def child_command(kind: str, spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]


# Table


def table(rows: list[dict]) -> str:
    out = ["| phase | GPU in use (GiB) | training max allocated (GiB) | seconds | note |", "|---|---|---|---|---|"]
    for r in rows:
        use = f"{r['in_use_gib']:.2f}" if r.get("in_use_gib") is not None else ""
        alloc = f"{r['train_max_allocated_gib']:.2f}" if r.get("train_max_allocated_gib") is not None else ""
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        out.append(f"| {r['phase']} | {use} | {alloc} | {secs} | {r.get('note', '')} |")
    return "\n".join(out)


def phase_note(row: dict) -> str:
    phase = row["phase"]
    if phase == "server up":
        return f"start {row['seconds']:.1f} s, share {row['gpu_memory_utilization']}"
    if phase == "asleep":
        return f"sleep (level 1) {row['seconds']:.2f} s"
    if phase == "training":
        state = "OOM" if row.get("oom") else f"{row.get('steps')} steps, fraction {row['train_fraction']}"
        fits = "within" if row["in_use_gib"] <= row["cap_gib"] else "OVER"
        return f"{state}; device peak {fits} the {row['cap_gib']:g} GiB cap"
    return f"wake {row['seconds']:.2f} s; completion after wake {'==' if row['same_completion'] else '!='} before"


# The GPU children


def child_build(spec: dict) -> None:
    """The 7B-shaped random checkpoint with the builtin's tokenizer, written to a .tmp folder then renamed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, source = Path(spec["model_dir"]), Path(spec["tokenizer_from"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(source))
    base = json.loads((source / "config.json").read_text())  # the builtin's config, edited to the 7B shape
    dims = dict(SHAPES[SHAPE])
    config = AutoConfig.for_model(dims.pop("model_type"), **dims, max_window_layers=dims["num_hidden_layers"],
                                  bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if (source / "generation_config.json").exists():
        shutil.copy(source / "generation_config.json", tmp / "generation_config.json")
    tmp.rename(out)


def child_train(spec: dict) -> None:
    import torch

    from slkit.core.params import load_params
    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import train_adapter

    workdir = Path(spec["workdir"])
    params = load_params(RECIPE, spec["overrides"])
    data = workdir / f"samples-{spec['length']}.jsonl"
    write_samples(data, load_tokenizer(params.model), spec["length"], n=spec["samples"])
    shutil.rmtree(workdir / "adapter", ignore_errors=True)
    shutil.rmtree(workdir / "adapter.tmp", ignore_errors=True)
    row: dict = {}
    try:
        summary = train_adapter(params, data, workdir / "adapter")
        row.update(steps=summary.get("steps"), peak_gpu_gib=summary.get("peak_gpu_gib"))
    except torch.OutOfMemoryError as err:
        row.update(oom=True, error=str(err).splitlines()[0][:300])
    row.update(train_max_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
               train_max_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
    print("ROW " + json.dumps(row), flush=True)


# The measurement


class DeviceMemory:
    """GiB in use on the device (torch.cuda.mem_get_info), net of this process's own CUDA context."""

    def __init__(self, device: int = 0):
        import torch

        self.torch, self.device = torch, device
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device}")  # the context exists from here on: the baseline includes it
        self.total_gib = torch.cuda.mem_get_info(device)[1] / GIB
        self.baseline_gib = self.raw()

    def raw(self) -> float:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return (total - free) / GIB

    def in_use(self) -> float:
        return round(self.raw() - self.baseline_gib, 2)


class Poller:
    """The peak of DeviceMemory.in_use while a block runs."""

    def __init__(self, memory: DeviceMemory, every_s: float = 0.2):
        self.memory, self.every_s, self.peak = memory, every_s, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.memory.in_use())
            self._stop.wait(self.every_s)

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.memory.in_use())


def greedy(url: str, model: str, prompt: str, new_tokens: int) -> str:
    import httpx

    reply = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "seed": 0,
        "ignore_eos": True})
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def timing(run_dir: Path, event: str) -> float | None:
    """The last `event`'s seconds in the run's engine_timings.jsonl (server_start: start_s)."""
    path = run_dir / "engine_timings.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    found = [line for line in lines if line.get("event") == event]
    return (found[-1].get("seconds", found[-1].get("start_s"))) if found else None


def run_child(kind: str, spec: dict, log: Path) -> dict:
    with open(log, "a") as out:
        proc = subprocess.run(child_command(kind, spec), stdout=subprocess.PIPE, stderr=out, text=True,
                              check=False)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 and not rows:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"the {kind} child exited {proc.returncode}; {log}:\n{tail}")
    return rows[-1] if rows else {}


def measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from slkit.core.params import load_params
    from slkit.engines.server import SERVED_MODEL, asleep_for_training, managed_server

    args.workdir.mkdir(parents=True, exist_ok=True)
    memory = DeviceMemory()
    model_dir = args.workdir / f"{SHAPE}-random"
    children_log = args.workdir / "children.log"
    if not (model_dir / "config.json").exists():
        print(f"building the random {SHAPE} checkpoint in {model_dir} ...", flush=True)
        started = time.monotonic()
        run_child("build", {"model_dir": str(model_dir), "tokenizer_from": str(args.tokenizer_from)}, children_log)
        print(f"  built in {time.monotonic() - started:.0f} s", flush=True)
    run_dir = args.workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    params = load_params(RECIPE, server_overrides(args, model_dir, memory.total_gib))
    common = {"bench": "small_card", "shape": SHAPE, "gpu": torch.cuda.get_device_name(0),
              "total_gib": round(memory.total_gib, 2), "cap_gib": args.cap_gib,
              "gpu_memory_utilization": params.engine.vllm.gpu_memory_utilization,
              "max_model_len": args.max_model_len, "train_length": args.length, "train_samples": args.samples,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "vllm": _version("vllm"),
              "transformers": _version("transformers"), "baseline_gib": round(memory.baseline_gib, 2)}
    rows: list[dict] = []

    def keep(row: dict) -> None:
        row = {**common, **row}
        row["note"] = phase_note(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    prompt = "Write a long story about a lighthouse keeper."
    print("starting the server (slkit's managed_server) ...", flush=True)
    with managed_server(params, run_dir) as server:
        url = server.info["url"]
        before = greedy(url, SERVED_MODEL, prompt, args.new_tokens)
        keep({"phase": "server up", "in_use_gib": memory.in_use(), "seconds": timing(run_dir, "server_start")})
        with asleep_for_training(params, run_dir, "small-card") as slept:
            assert slept, "the server did not sleep: engine.vllm.sleep_during_training"
            time.sleep(1.0)
            asleep = memory.in_use()
            keep({"phase": "asleep", "in_use_gib": asleep, "seconds": timing(run_dir, "sleep")})
            fraction = training_fraction(args.cap_gib, asleep, memory.total_gib)
            spec = {"workdir": str(args.workdir), "length": args.length, "samples": args.samples,
                    "overrides": train_overrides(args, model_dir, fraction)}
            print(f"training under gpu_memory_fraction {fraction} ({fraction * memory.total_gib:.2f} GiB) ...",
                  flush=True)
            started = time.monotonic()
            with Poller(memory) as poll:
                trained = run_child("train", spec, children_log)
            train_s = round(time.monotonic() - started, 1)
        after = greedy(url, SERVED_MODEL, prompt, args.new_tokens)
        keep({"phase": "training", "in_use_gib": round(poll.peak, 2), "seconds": train_s,
              "train_fraction": fraction, **trained})
        keep({"phase": "awake", "in_use_gib": memory.in_use(), "seconds": timing(run_dir, "wake"),
              "same_completion": before == after, "completion_before": before, "completion_after": after})
    return rows


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def dry_run(args: argparse.Namespace) -> None:
    """What measure() would run, on a card of --total-gib, with the asleep server assumed to hold 1 GiB."""
    from slkit.core.params import load_params
    from slkit.engines.server import server_command

    model_dir = args.workdir / f"{SHAPE}-random"
    with tempfile.TemporaryDirectory() as stand_in:  # model.path must be a model directory: a config stands in
        (Path(stand_in) / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        params = load_params(RECIPE, server_overrides(args, Path(stand_in), args.total_gib))
    server = [str(model_dir) if part == stand_in else part for part in server_command(params, stand_in, 0, 1, 1)]
    fraction = training_fraction(args.cap_gib, 1.0, args.total_gib)
    print(f"card {args.total_gib:g} GiB, cap {args.cap_gib:g} GiB; tokenizer from {args.tokenizer_from}")
    print("build:", " ".join(child_command("build", {"model_dir": str(model_dir),
                                                     "tokenizer_from": str(args.tokenizer_from)})))
    print("server:", " ".join(server))
    print(f"sleep: level 1 ({params.engine.vllm.sleep_during_training}); training fraction {fraction} "
          "if the asleep server holds 1 GiB")
    print("train:", " ".join(child_command("train", {"workdir": str(args.workdir), "length": args.length,
                                                     "samples": args.samples,
                                                     "overrides": train_overrides(args, model_dir, fraction)})))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        (child_build if args.child == "build" else child_train)(json.loads(args.spec))
        return
    if args.dry_run:
        dry_run(args)
        return
    rows = measure(args)
    print(table(rows))
    awake = rows[-1]
    print(f"server start {rows[0]['seconds']} s, sleep {rows[1]['seconds']} s, wake {awake['seconds']} s; "
          f"greedy completion after wake {'equals' if awake['same_completion'] else 'DIFFERS FROM'} the one before")


if __name__ == "__main__":
    main()
