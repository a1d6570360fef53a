"""Training tokens/s on one GPU against N GPUs through `accelerate launch` (the train stage's path).

    python bench/train_multi_gpu.py --workdir /tmp/slkit-bench --gpus 2 --length 8192 --samples 16
    python bench/train_multi_gpu.py --tiny --gpus 2 --workdir /tmp/b      # CPU check: gloo processes

The GPU recipe params/qwen2.5-7b-24gb.yaml (4-bit QLoRA, chunked loss, offload, Liger) on random
weights of the real shape; the same samples, one epoch, batch 1 per process. Data parallel: each
process sees 1/N of the samples, so N GPUs take 1/N of the steps.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_memory import RECIPE, build_checkpoint, write_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slkit-bench"))
    parser.add_argument("--shape", default="qwen2-7b")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--config", default="ddp", help="accelerate config: ddp, fsdp, zero3 or a file")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    import torch

    from slkit.core.params import load_params
    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import train_adapter

    on_gpu = torch.cuda.is_available()
    shape = "tiny-llama" if args.tiny else args.shape
    model_dir = build_checkpoint(shape, args.workdir)
    rows = []
    for processes in (1, args.gpus):
        params = load_params(RECIPE, {
            "model.path": str(model_dir), "training.max_length": args.length, "training.epochs": 1.0,
            "training.warmup_ratio": 0.0, "training.num_processes": processes,
            "training.gradient_accumulation": 1,  # an optimizer step per sample and process, as it measured
            "training.accelerate_config": args.config if on_gpu else "cpu",
            **({} if on_gpu else {"training.optimizer": "adamw_torch", "model.load_in_4bit": False,
                                  "training.activation_offload": False, "training.liger_kernels": False})})
        data = args.workdir / f"samples-{args.length}.jsonl"
        write_samples(data, load_tokenizer(params.model), args.length, n=args.samples)
        s = train_adapter(params, data, args.workdir / f"adapter-{processes}")
        rows.append({"shape": shape, "processes": s["processes"], "config": params.training.accelerate_config if processes > 1 else "-",
                     "samples": s["samples"], "length": args.length, "steps": s["steps"], "seconds": s["seconds"],
                     "tok_s": round(s["tokens"] / s["seconds"], 1), "peak_gib_rank0": s["peak_gpu_gib"],
                     "final_loss": round(s["final_loss"], 4)})
        print("ROW " + json.dumps(rows[-1]), flush=True)
        if on_gpu:
            torch.cuda.empty_cache()
    print("| shape | processes | config | samples x tokens | steps | train seconds | tokens/s | speed-up | peak GiB (rank 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['processes']} | {r['config']} | {r['samples']} x {r['length']} | {r['steps']} | "
              f"{r['seconds']} | {r['tok_s']:,.0f} | {r['tok_s'] / rows[0]['tok_s']:.2f}x | {r['peak_gib_rank0']} |")


if __name__ == "__main__":
    main()
