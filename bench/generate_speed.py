"""Generation tokens/s of slkit's engines against plain single-sequence `generate`, same model, same tokens.

    python bench/generate_speed.py --workdir /tmp/slkit-bench --shapes qwen2-7b
    python bench/generate_speed.py --tiny --workdir /tmp/b       # CPU check (tests run it)
    python bench/generate_speed.py --vllm --workdir /tmp/slkit-bench --prompts 64 --new-tokens 2048 --gib 22

--vllm compares, side by side, a bare vLLM `LLM.generate` with a rank-16 LoRA (an earlier probe's setup,
docs/benchmarks.md) against slkit's VLLMEngine driven by slkit's own drafts stage code
(slkit.method.drafts.write_drafts writing records), bf16 and 4-bit weights, same prompt token ids, same
sampling, same memory budget; each measurement in a fresh process so vLLM gets the GPU back.

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

    from slkit.engines.base import Request
    from slkit.engines.transformers import TransformersEngine
    from slkit.core.params import load_params

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


def build_vllm_checkpoint(shape: str, workdir: Path) -> tuple[Path, Path]:
    """A random `shape` checkpoint whose tokenizer covers the whole vocabulary (vLLM detokenizes every
    sampled id), and a random rank-16 all-linear LoRA adapter for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from train_memory import SHAPES

    out, adapter = workdir / f"{shape}-full-vocab", workdir / f"{shape}-lora16"
    if (adapter / "adapter_config.json").exists():
        return out, adapter
    dims = dict(SHAPES[shape])
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(dims["vocab_size"] - len(specials))])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(str(out))
    config = AutoConfig.for_model(dims.pop("model_type"), **dims, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(str(adapter))
    return out, adapter


def vllm_case(case: str, model_dir: Path, adapter: Path, prompts: int, new_tokens: int, bf16: bool,
              gib: float, workdir: Path) -> dict:
    """One measurement in this process: 'bare' (vLLM's own API) or 'slkit' (the drafts stage on VLLMEngine)."""
    import torch

    from slkit.core.params import load_params
    from slkit.models.chat import render_user_turn, with_bos

    utilization = round(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory, 4)
    overrides = {"model.path": str(model_dir), "model.load_in_4bit": not bf16, "model.prompt_format": "plain",
                 "engine.backend": "vllm", "engine.vllm.gpu_memory_utilization": utilization,
                 "engine.vllm.max_model_len": 4096, "sampling.max_new_tokens": new_tokens,
                 "sampling.min_new_tokens": new_tokens, "sampling.stop": [], "drafts.samples_per_query": 1,
                 "drafts.max_tries": 1, "quality.check_ending": False, "quality.check_repetition": False,
                 "quality.check_meta_talk": False}
    params = load_params(RECIPE, overrides)
    texts = [f"Write a long essay, part {i}, about rivers and the towns along them." for i in range(prompts)]
    if case == "bare":
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = [tok(with_bos(tok, render_user_turn(tok, t, "plain")), add_special_tokens=False)["input_ids"] for t in texts]
        llm = LLM(model=str(model_dir), dtype="bfloat16", enable_lora=True, max_lora_rank=16, max_loras=2,
                  gpu_memory_utilization=utilization, max_model_len=4096, seed=0,
                  **({} if bf16 else {"quantization": "bitsandbytes"}))
        s = params.sampling
        sampling = [SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=s.temperature, top_p=s.top_p,
                                   top_k=s.top_k, repetition_penalty=s.repetition_penalty, seed=i)
                    for i in range(prompts)]
        lora = LoRARequest("generator", 1, str(adapter))
        llm.generate([{"prompt_token_ids": ids[0]}], sampling[0], lora_request=lora, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], sampling, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        from slkit.method.drafts import write_drafts
        from slkit.engines.base import Request
        from slkit.engines import load_engine
        from slkit.core.records import RecordWriter

        engine = load_engine(params, {"generator": str(adapter), "extender": str(adapter)})
        engine.generate([Request(engine.render(texts[0]), "generator", new_tokens)], params.sampling)  # warm-up
        warm_tokens = engine.generated_tokens
        queries = [{"id": f"q{i}", "query": t, "language": "en"} for i, t in enumerate(texts)]
        path = workdir / f"drafts-{'bf16' if bf16 else 'nf4'}.jsonl"
        for stale in (path, path.with_name(path.name + ".partial")):
            stale.unlink(missing_ok=True)
        writer = RecordWriter(path)
        start = time.perf_counter()
        write_drafts(engine, queries, params, 1, writer, params.quality)
        seconds = time.perf_counter() - start
        records = writer.finish()
        assert len(records) == prompts, f"{len(records)} drafts written for {prompts} queries"
        produced = engine.generated_tokens - warm_tokens
    row = {"engine": "bare vLLM LLM.generate" if case == "bare" else "slkit VLLMEngine via drafts stage",
           "weights": "bf16" if bf16 else "nf4 (bitsandbytes)", "prompts": prompts, "new_tokens": new_tokens,
           "produced_tokens": produced, "gib": gib, "seconds": round(seconds, 2),
           "tok_s": round(produced / seconds, 1)}
    print("ROW " + json.dumps(row), flush=True)
    return row


def run_vllm(args) -> list[dict]:
    """Build once, then each case in a fresh process (vLLM frees the GPU only when its process ends)."""
    import subprocess

    model_dir, adapter = build_vllm_checkpoint(args.shapes[0], args.workdir)
    rows = []
    for bf16 in [w == "bf16" for w in args.vllm_weights]:
        for case in ("bare", "slkit"):
            cmd = [sys.executable, __file__, "--vllm-case", case, "--workdir", str(args.workdir),
                   "--shapes", args.shapes[0], "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens),
                   "--gib", str(args.gib)] + (["--bf16"] if bf16 else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode or not lines:
                print(done.stdout[-3000:], done.stderr[-5000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"{case} ({'bf16' if bf16 else 'nf4'}) failed")
            rows.append(json.loads(lines[-1]))
    print("| engine | weights | prompts x new tokens | GiB limit | tokens/s | slkit / bare |\n|---|---|---|---|---|---|")
    for r in rows:
        bare = next(b for b in rows if b["weights"] == r["weights"] and b["engine"].startswith("bare"))
        print(f"| {r['engine']} | {r['weights']} | {r['prompts']} x {r['new_tokens']} | {r['gib']} | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / bare['tok_s']:.3f} |")
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
    parser.add_argument("--vllm", action="store_true", help="bare vLLM against slkit's VLLMEngine (GPU, vLLM installed)")
    parser.add_argument("--vllm-case", choices=["bare", "slkit"], help=argparse.SUPPRESS)
    parser.add_argument("--gib", type=float, default=22.0, help="GPU memory vLLM may use (--vllm)")
    parser.add_argument("--vllm-weights", nargs="+", choices=["bf16", "nf4"], default=["bf16", "nf4"])
    args = parser.parse_args()
    if args.vllm_case:
        model_dir, adapter = build_vllm_checkpoint(args.shapes[0], args.workdir)
        vllm_case(args.vllm_case, model_dir, adapter, args.prompts, args.new_tokens, args.bf16, args.gib, args.workdir)
        return
    if args.vllm:
        run_vllm(args)
        return
    rows = []
    for shape in ["tiny-llama"] if args.tiny else args.shapes:
        rows += run(shape, args.workdir, args.prompts, args.new_tokens, args.batch, args.bf16)
    print("| shape | engine | weights | prompts x new tokens | tokens/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['engine']} | {r['weights']} | {r['prompts']} x {r['new_tokens']} | {r['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
