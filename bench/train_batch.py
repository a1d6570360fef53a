"""One adapter trained at global batch 1 and at the default global batch 8 (gradient accumulation), side by side.

    python bench/train_batch.py --model builtin:qwen2.5-coder-0.5b-instruct --samples 16 --epochs 2
    python bench/train_batch.py --model builtin:tiny-random-llama --samples 4 --epochs 1   # CPU check (tests run it)

The training stage's own path (slkit.training.adapters.train_adapter) with the smoke recipe's training section
and the method's values (lr 1e-4, cosine, warm-up 0.1, LoRA r 8 / alpha 16, batch 1 per step), on English
paragraphs of this repository's README as completions. Each row: optimizer steps, seconds, the first and final
logged loss (a step's mean over its global batch: one sample at batch 1, eight at batch 8, so the first is not
comparable across rows) and the mean response-token loss of the whole set under the trained adapter (and under
the untrained one: the base model). With accumulation the same samples make 1/8 of the updates, each over 8.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_samples(path: Path, count: int) -> None:
    """`count` (prompt, completion) pairs: README paragraphs of 300-1,200 characters, in file order."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", (REPO / "README.md").read_text(encoding="utf-8"))]
    prose = [p for p in paragraphs if 300 <= len(p) <= 1200 and p[0].isalpha()]
    if len(prose) < count:
        raise SystemExit(f"README.md has {len(prose)} paragraphs of prose, fewer than --samples {count}")
    path.write_text("".join(json.dumps({"prompt": f"Write the paragraph of slkit's README numbered {i + 1}.",
                                        "completion": text}) + "\n" for i, text in enumerate(prose[:count])))


def set_loss(params, data: Path, adapter: Path | None) -> float:
    """Mean cross-entropy per response token over every sample of `data`, with `adapter` (None: a fresh LoRA,
    which leaves the base model unchanged)."""
    import torch

    from slkit.core.records import read_jsonl
    from slkit.models.loading import load_tokenizer
    from slkit.training.adapters import build_lora_model
    from slkit.training.batches import tokenize_example
    from slkit.training.long_context import IGNORE

    tokenizer = load_tokenizer(params.model)
    model = build_lora_model(params, str(adapter) if adapter else None).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in read_jsonl(data, required=["prompt", "completion"]):
            f = tokenize_example(tokenizer, e["prompt"], e["completion"], params.training.max_length,
                                 params.model.prompt_format)
            labels = torch.tensor([f["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=torch.tensor([f["input_ids"]]), labels=labels).loss.item() * n
            count += n
    return round(total / count, 4)


def main() -> None:
    from slkit.core.params import load_params
    from slkit.training.adapters import train_adapter

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--workdir", default="/tmp/slkit-train-batch")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sft.jsonl"
    write_samples(data, args.samples)
    rows = []
    base_loss = None
    for accumulation in args.accumulation:
        params = load_params(REPO / "params" / "smoke.yaml", {
            "model.path": args.model, "model.dtype": "auto", "training.epochs": args.epochs,
            "training.max_length": args.max_length, "training.gradient_accumulation": accumulation,
            "training.learning_rate": 1e-4, "training.warmup_ratio": 0.1, "training.gradient_checkpointing": False})
        out = workdir / f"adapter-ga{accumulation}"
        s = train_adapter(params, data, out)
        base_loss = base_loss if base_loss is not None else set_loss(params, data, None)
        row = {"model": args.model, "samples": s["samples"], "tokens": s["tokens"], "epochs": args.epochs,
               "global_batch": accumulation * params.training.batch_size, "steps": s["steps"], "seconds": s["seconds"],
               "first_loss": s["first_loss"], "final_loss": s["final_loss"],
               "set_loss_before": base_loss, "set_loss_after": set_loss(params, data, out)}
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
    print("\n| global batch | samples x epochs | steps | seconds | first loss | final loss | set loss before -> after |"
          "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['global_batch']} | {r['samples']} x {r['epochs']:g} | {r['steps']} | {r['seconds']} | "
              f"{r['first_loss']:.4f} | {r['final_loss']:.4f} | {r['set_loss_before']} -> {r['set_loss_after']} |")


if __name__ == "__main__":
    main()
