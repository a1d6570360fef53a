"""Peak GPU memory and tokens/s of a QLoRA training step at long lengths: the common recipe vs slkit's.

    python bench/train_memory.py --workdir /tmp/slkit-bench --shapes qwen2-7b --lengths 4096 8192 16384 32768
    python bench/train_memory.py --shapes qwen2-7b --lengths 16384 32768 --variants slkit trl trl+liger
    python bench/train_memory.py --tiny --workdir /tmp/b --lengths 64 128     # CPU check (tests run it)

Models are randomly initialised with the real shapes (honest for memory and speed, not for text).
Each measurement runs in a fresh process (clean CUDA peak, survives an OOM) and trains 2 optimizer
steps of batch 1 on one sequence of exactly `length` tokens; tokens/s is taken from the second step.
- naive: peft's prepare_model_for_kbit_training (fp32 upcast) + the model's own loss, paged AdamW 8-bit.
- slkit*: slkit.training.adapters.train_adapter, the function the 03_training notebook calls, with the GPU recipe
  params/qwen2.5-7b-24gb.yaml and the variant's overrides (TRL's SFTTrainer since 2026-12-01: the rows before that
  date measured slkit's own trainer, a chunked fp32 cross-entropy and torch's save_on_cpu).
- trl*: TRL's SFTTrainer on the same samples (prompt, completion): its chunked loss (loss_type "nll", which
  TRL >= 1.x computes chunked; "chunked_nll" is its deprecated alias), its activation offloading, non-reentrant
  checkpointing, paged AdamW 8-bit; trl+liger adds Liger's kernels through transformers' public switch
  (TrainingArguments.use_liger_kernel; TRL leaves out Liger's fused cross-entropy, as slkit does).
All: nf4 with double quant, bf16 compute, LoRA r=16 alpha=32 dropout 0.05 on all linear layers (LORA).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # the published configs' dimensions
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                     max_position_embeddings=131072, tie_word_embeddings=False),
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=5e5,
                        max_position_embeddings=131072, tie_word_embeddings=False),
    # params/qwen2.5-3b-16gb.yaml's model; its memory in docs/benchmarks.md is an estimate until this shape is run
    "qwen2.5-3b": dict(model_type="qwen2", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=True),
    # the 1.5B builtin's shape (bench/train_speed.py: training speed at the growth recipe's lengths)
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "tiny-llama": dict(model_type="llama", vocab_size=1024, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=False),
}
RECIPE = REPO / "params" / "qwen2.5-7b-24gb.yaml"
# The adapter every variant trains (the recipes' own default is rank 8; the tables were measured at rank 16).
LORA = {"training.lora_r": 16, "training.lora_alpha": 32, "training.lora_dropout": 0.05}
TRL_VARIANTS = {"trl": {"use_liger_kernel": False}, "trl+liger": {"use_liger_kernel": True}}
VARIANTS = {
    "naive": None,
    "slkit": {},  # the GPU recipe as shipped (chunked loss + activation offload + Liger kernels)
    "slkit-chunked": {"training.activation_offload": False, "training.liger_kernels": False},
    "slkit+offload": {"training.activation_offload": True},
    "slkit+offload+liger": {"training.activation_offload": True, "training.liger_kernels": True},
    "slkit+offload+liger+tiled": {"training.activation_offload": True, "training.liger_kernels": True,
                                  "training.mlp_tile_tokens": 4096},
    **TRL_VARIANTS,
}


def build_checkpoint(shape: str, workdir: Path) -> Path:
    """A random-weight bf16 checkpoint of `shape` with a small tokenizer, saved once under workdir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slkit.models.loading import train_small_tokenizer

    out = workdir / shape
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_small_tokenizer(out)
    dims = dict(SHAPES[shape])
    config = AutoConfig.for_model(dims.pop("model_type"), **dims, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    return out


def write_samples(path: Path, tokenizer, length: int, n: int = 2) -> None:
    """n (prompt, completion) pairs whose tokens reach `length` (training cuts them there)."""
    words = " ".join(line for line in (REPO / "slkit" / "core" / "exemplars" / "en.txt").read_text().splitlines())
    per_copy = len(tokenizer(words)["input_ids"])
    completion = " ".join([words] * (length // per_copy + 2))
    path.write_text("".join(json.dumps({"prompt": "Write at length.", "completion": completion}) + "\n" for _ in range(n)))


def measure_slkit(model_dir: Path, length: int, overrides: dict, workdir: Path) -> dict:
    import torch

    from slkit.models.loading import load_tokenizer
    from slkit.core.params import load_params
    from slkit.training.adapters import train_adapter

    on_gpu = torch.cuda.is_available()
    params = load_params(RECIPE, {"model.path": str(model_dir), "training.max_length": length,
                                  "training.epochs": 1.0, "training.warmup_ratio": 0.0, **LORA,
                                  "training.gradient_accumulation": 1,  # a step is one sample: its memory and time
                                  **({} if on_gpu else {"training.optimizer": "adamw_torch", "model.dtype": "bfloat16"}),
                                  **overrides})
    data = workdir / f"samples-{length}.jsonl"
    write_samples(data, load_tokenizer(params.model), length)
    summary = train_adapter(params, data, workdir / "adapter-out")
    return {"peak_gib": summary["peak_gpu_gib"], "step_s": summary["step_seconds"][-1], "steps": summary["steps"]}


def measure_naive(model_dir: Path, length: int, workdir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    on_gpu = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if on_gpu else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if on_gpu:
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data = workdir / f"samples-{length}.jsonl"
    write_samples(data, tok, length, n=1)
    ids = tok(json.loads(data.read_text())["completion"], return_tensors="pt")["input_ids"][:, :length]
    ids = ids.to(model.device)
    model.train()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(2):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None
    return {"peak_gib": peak, "step_s": round(seconds[-1], 4), "steps": 2}


def measure_trl(model_dir: Path, length: int, options: dict, workdir: Path) -> dict:
    """TRL's SFTTrainer with its own long-sequence switches, on the samples slkit trains on (2 of `length` tokens)."""
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from slkit.training.trainer import checkpointing_args
    from slkit.training.trainer import StepTimer

    on_gpu = torch.cuda.is_available()
    # slkit's load_model's quantisation, so that only the trainer differs
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0 if on_gpu else "cpu"})
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    data = workdir / f"samples-{length}.jsonl"
    write_samples(data, tok, length)
    dataset = Dataset.from_list([json.loads(line) for line in data.read_text().splitlines()])
    args = SFTConfig(
        output_dir=str(workdir / "trl-out"), per_device_train_batch_size=1, gradient_accumulation_steps=1,
        num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0,
        optim="paged_adamw_8bit" if on_gpu else "adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, bf16=on_gpu, use_cpu=not on_gpu, dataloader_pin_memory=on_gpu,
        max_length=length, packing=False, loss_type="nll",
        activation_offloading=on_gpu,  # TRL's offloading needs an accelerator (CUDA streams); off for --tiny on CPU
        **checkpointing_args(SFTConfig, True), **options)
    lora = LoraConfig(r=LORA["training.lora_r"], lora_alpha=LORA["training.lora_alpha"],
                      lora_dropout=LORA["training.lora_dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora,
                         callbacks=[timer := StepTimer()])
    seq_tokens = sorted({len(ids) for ids in trainer.train_dataset["input_ids"]})
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None
    return {"peak_gib": peak, "step_s": timer.seconds[-1], "steps": result.global_step, "seq_tokens": seq_tokens,
            "trl": trl.__version__}


def measure_one(shape: str, variant: str, length: int, workdir: Path) -> dict:
    import torch

    model_dir = build_checkpoint(shape, workdir)
    row = {"shape": shape, "variant": variant, "length": length}
    try:
        if VARIANTS[variant] is None:
            row.update(measure_naive(model_dir, length, workdir))
        elif variant in TRL_VARIANTS:
            row.update(measure_trl(model_dir, length, TRL_VARIANTS[variant], workdir))
        else:
            row.update(measure_slkit(model_dir, length, VARIANTS[variant], workdir))
        row["tok_s"] = round(length / row["step_s"], 1)
    except torch.OutOfMemoryError:
        row["oom"] = True
    return row


def run_child(shape: str, variant: str, length: int, workdir: Path, timeout: int) -> dict:
    """One measurement in a fresh process; its last stdout line is the JSON row."""
    cmd = [sys.executable, __file__, "--child", shape, variant, str(length), "--workdir", str(workdir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "variant": variant, "length": length, "error": f"timeout {timeout}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = any("OutOfMemory" in line or "out of memory" in line for line in tail)
        return {"shape": shape, "variant": variant, "length": length, **({"oom": True} if oom else {"error": " | ".join(tail)})}
    return json.loads(lines[-1])


def fmt(row: dict) -> str:
    if row.get("oom"):
        return "OOM"
    if "error" in row:
        return "error"
    mem = f"{row['peak_gib']:.1f} GiB, " if row.get("peak_gib") is not None else ""
    return f"{mem}{row['tok_s']:,.0f} tok/s"


def table(rows: list[dict]) -> str:
    lengths = sorted({r["length"] for r in rows})
    out = ["| shape | recipe | " + " | ".join(f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["shape"] == shape):
            cells = {r["length"]: fmt(r) for r in rows if r["shape"] == shape and r["variant"] == variant}
            out.append(f"| {shape} | {variant} | " + " | ".join(cells.get(n, "") for n in lengths) + " |")
    return "\n".join(out)


def ratios(rows: list[dict], base: str = "slkit") -> list[str]:
    """Each TRL variant against `base` at the same shape and length: peak memory and tokens/s, TRL / base."""
    done = {(r["shape"], r["variant"], r["length"]): r for r in rows if r.get("tok_s")}
    out = []
    for (shape, variant, length), r in done.items():
        b = done.get((shape, base, length))
        if variant in TRL_VARIANTS and b:
            mem = f"memory {r['peak_gib'] / b['peak_gib']:.3f}x, " if r.get("peak_gib") and b.get("peak_gib") else ""
            out.append(f"{shape} {length:,} tokens, {variant} / {base}: {mem}tok/s {r['tok_s'] / b['tok_s']:.3f}x")
    return out


def search_longest(shape: str, variant: str, rows: list[dict], budget_gib: float, workdir: Path, timeout: int,
                   step: int = 8192) -> list[dict]:
    """Longest length (multiple of `step`) whose peak stays within budget: extrapolate linearly, then verify."""
    ok = sorted((r for r in rows if r["shape"] == shape and r["variant"] == variant and r.get("peak_gib")),
                key=lambda r: r["length"])
    if len(ok) < 2:
        return []
    a, b = ok[-2], ok[-1]
    slope = (b["peak_gib"] - a["peak_gib"]) / (b["length"] - a["length"])
    guess = max(step, int((b["length"] + (budget_gib - b["peak_gib"]) / slope) // step * step))
    tried = []
    while guess > b["length"]:
        row = run_child(shape, variant, guess, workdir, timeout)
        row["search"] = True
        tried.append(row)
        print(json.dumps(row), flush=True)
        if row.get("peak_gib") and row["peak_gib"] <= budget_gib:
            nxt = run_child(shape, variant, guess + step, workdir, timeout)
            nxt["search"] = True
            tried.append(nxt)
            print(json.dumps(nxt), flush=True)
            break
        guess -= step
    return tried


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/slkit-bench"))
    parser.add_argument("--shapes", nargs="+", default=["qwen2-7b", "llama3.1-8b"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    parser.add_argument("--search-gib", type=float, default=None, help="also search the longest length within this budget")
    parser.add_argument("--search-variant", default="slkit")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU shape (for tests)")
    parser.add_argument("--out", type=Path, help="append the rows (jsonl) here")
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        shape, variant, length = args.child
        print(json.dumps(measure_one(shape, variant, int(length), args.workdir)), flush=True)
        return
    shapes = ["tiny-llama"] if args.tiny else args.shapes
    rows = []

    def keep(new: list[dict]) -> None:  # to --out as they come: a run cut short keeps its rows
        rows.extend(new)
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)

    for shape in shapes:
        build_checkpoint(shape, args.workdir)
        for variant in args.variants:
            for length in sorted(args.lengths):
                row = run_child(shape, variant, length, args.workdir, args.timeout)
                keep([row])
                print(json.dumps(row), flush=True)
                if row.get("oom"):
                    break  # longer ones cannot fit either
        if args.search_gib:
            keep(search_longest(shape, args.search_variant, rows, args.search_gib, args.workdir, args.timeout))
    print(table([r for r in rows if not r.get("search")]))
    print("\n".join(ratios(rows)))
    found = [r for r in rows if r.get("search") and r.get("peak_gib") and r["peak_gib"] <= (args.search_gib or 0)]
    for r in found:
        print(f"longest within {args.search_gib} GiB ({r['shape']}, {r['variant']}): {r['length']:,} tokens "
              f"at {r['peak_gib']} GiB, {r['tok_s']:,.0f} tok/s")


if __name__ == "__main__":
    main()
