"""Decode speed of a model on this CPU: float32 against bfloat16, per batch size, side by side in one run.

    python bench/cpu_generate.py --model builtin:qwen2.5-coder-0.5b-instruct --batches 1 8 16 32

Prints one row per (dtype, batch): milliseconds per decode step after a 64-token prompt, tokens/s,
and the ratio to float32 at the same batch. `model.dtype: auto` picks bfloat16 on a CPU only where
torch reports AVX512-BF16 or AMX; this table shows why (and whether it holds on your machine).
"""
from __future__ import annotations

import argparse
import time


def decode_ms(model, batch: int, steps: int, prompt_tokens: int = 64) -> float:
    """Mean wall milliseconds of one decode step (KV cache on) for `batch` sequences."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_tokens))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, torch.randint(0, vocab, (batch, 1))
        out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
        cache = out.past_key_values
        start = time.perf_counter()
        for _ in range(steps):
            cache = model(token, past_key_values=cache, use_cache=True).past_key_values
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from slkit.models import compute_dtype, resolve_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    path = resolve_model_path(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, model.dtype auto -> {compute_dtype('auto', 'cpu')}")
    results: dict[tuple[str, int], float] = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        for batch in args.batches:
            results[dtype, batch] = decode_ms(model, batch, args.steps)
        del model
    print("| dtype | batch | ms / step | tokens/s | time vs float32 |")
    print("|---|---|---|---|---|")
    for (dtype, batch), ms in results.items():
        print(f"| {dtype} | {batch} | {ms:.0f} | {batch * 1000 / ms:.1f} | {ms / results['float32', batch]:.2f}x |")


if __name__ == "__main__":
    main()
