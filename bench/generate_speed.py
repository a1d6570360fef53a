"""Generation tokens/s of slkit's engines against plain single-sequence `generate`, same model, same tokens.

    python bench/generate_speed.py --workdir /tmp/slkit-bench --shapes qwen2-7b
    python bench/generate_speed.py --tiny --workdir /tmp/b       # CPU check (tests run it)

Randomly initialised weights of the real shapes (bench/train_memory.py builds them), loaded as the
GPU recipe params/qwen2.5-7b-24gb.yaml loads them (4-bit nf4 unless --bf16). Every run generates
exactly --new-tokens per prompt (min_new_tokens = max_new_tokens), so tokens/s compare like for like.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_memory import RECIPE, build_checkpoint  # noqa: E402


def run(shape: str, workdir: Path, prompts: int, new_tokens: int, batch: int, bf16: bool) -> list[dict]:
    import torch

    from slkit.engines import Request, TransformersEngine
    from slkit.params import load_params

    model_dir = build_checkpoint(shape, workdir)
    on_gpu = torch.cuda.is_available()
    params = load_params(RECIPE, {"model.path": str(model_dir), "engine.batch_size": batch,
                                  "model.load_in_4bit": on_gpu and not bf16})
    sampling = params.sampling.model_copy(update={"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "stop": []})
    engine = TransformersEngine(params)
    texts = [f"Write a long essay, part {i}, about rivers and the towns along them." for i in range(prompts)]
    requests = [Request(engine.render(t), "generator", new_tokens, seed=i) for i, t in enumerate(texts)]
    rows = []

    def timed(label: str, fn) -> None:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"shape": shape, "engine": label, "prompts": prompts, "new_tokens": new_tokens,
                     "weights": "bf16" if (bf16 or not on_gpu) else "nf4", "seconds": round(seconds, 2),
                     "tok_s": round(prompts * new_tokens / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)

    engine.generate(requests[:1], sampling)  # warm-up (kernels, allocator)

    def plain():
        model, tok = engine.model, engine.tokenizer
        for r in requests:
            enc = tok(r.prompt, return_tensors="pt").to(engine.device)
            out = model.generate(**enc, do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens

    timed("plain generate, batch 1", plain)
    engine.params = params.model_copy(update={"engine": params.engine.model_copy(update={"batch_size": 1})})
    timed("slkit transformers, batch 1", lambda: engine.generate(requests, sampling))
    engine.params = params
    timed(f"slkit transformers, batch {batch}", lambda: engine.generate(requests, sampling))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slkit-bench"))
    parser.add_argument("--shapes", nargs="+", default=["qwen2-7b"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="the engine's batch (the GPU recipe's engine.batch_size)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights instead of the recipe's 4-bit")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    rows = []
    for shape in ["tiny-llama"] if args.tiny else args.shapes:
        rows += run(shape, args.workdir, args.prompts, args.new_tokens, args.batch, args.bf16)
    print("| shape | engine | weights | prompts x new tokens | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['engine']} | {r['weights']} | {r['prompts']} x {r['new_tokens']} | {r['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
