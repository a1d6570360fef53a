"""Training an adapter (Generator or Extender) with LoRA or 4-bit QLoRA.

    train_adapter(params, "runs/x/iter_1/generator_sft.jsonl", "runs/x/iter_1/adapters/generator",
                  init_adapter="runs/x/iter_0/adapters/generator")

slkit loads the base model (4-bit when asked), adds or continues the LoRA adapter and tokenizes the
examples (slkit.training.batches); TRL's SFTTrainer trains (slkit.training.trainer). Memory recipe: no
whole-model fp32 upcast, non-reentrant gradient checkpointing, TRL's fused LM-head loss (no full-sequence
logits), activation offloading and Liger's kernels when asked.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import set_seed

from slkit.core.params import Params, load_params
from slkit.core.records import read_jsonl, write_json_atomic
from slkit.core.schema import AdapterTrainingSummary
from slkit.models.loading import load_model, load_tokenizer
from slkit.training.batches import tokenize_example
from slkit.training.distributed import launch_distributed
from slkit.training.long_context import IGNORE
from slkit.training.trainer import sft_trainer


def build_lora_model(params: Params, init_adapter: str | None):
    """Base model (4-bit when asked) with a trainable LoRA adapter: fresh, or continued from `init_adapter`."""
    tp = params.training
    model = load_model(params.model, device=params.engine.device, for_training=True)
    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    config = LoraConfig(r=tp.lora_r, lora_alpha=tp.lora_alpha, lora_dropout=tp.lora_dropout,
                        target_modules=tp.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def tensorboard_dir(adapter_output: Path) -> Path:
    """<iteration dir>/tensorboard/<role>/ for the adapter written to <iteration dir>/adapters/<role>/: beside the
    run's other records (Trainer's default, under its checkpoint directory, is deleted after training)."""
    return adapter_output.parent.parent / "tensorboard" / adapter_output.name


@contextlib.contextmanager
def _tensorboard_logging_dir(path: Path):
    """transformers' TensorBoardCallback reads its directory from TENSORBOARD_LOGGING_DIR when Trainer is built;
    a directory the user set there is kept."""
    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)



def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest Trainer checkpoint that was saved to its end. Trainer writes trainer_state.json last,
    so a kill while saving leaves a checkpoint without it, which would fail to resume."""
    complete = [p for p in checkpoints.glob("checkpoint-*")
                if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[1]))) if complete else None


def train_adapter(params: Params, examples_path: str | Path, output_dir: str | Path,
                  init_adapter: str | None = None) -> dict[str, Any]:
    """Train one adapter on a jsonl of {"prompt", "completion"}; writes a PEFT adapter to output_dir.

    With fewer than training.min_samples examples nothing is trained: the previous adapter is
    carried over (or a fresh, untrained LoRA saved, which leaves the base model unchanged).
    With training.num_processes > 1 it runs itself under `accelerate launch` (DDP, FSDP or ZeRO-3);
    rank 0 writes the files. Returns a summary (samples, tokens, steps, final loss, seconds, peak memory).
    """
    if params.training.num_processes > 1:
        return launch_distributed(params, examples_path, output_dir, init_adapter)
    return train_in_this_process(params, examples_path, output_dir, init_adapter)


def train_in_this_process(params: Params, examples_path: str | Path, output_dir: str | Path,
                          init_adapter: str | None = None) -> dict[str, Any]:
    """train_adapter's work, in this process (one rank of a distributed run, or the only one)."""
    tp = params.training
    main_process = int(os.environ.get("RANK", 0)) == 0
    output_dir = Path(output_dir)
    examples = read_jsonl(examples_path, required=["prompt", "completion"])
    tokenizer = load_tokenizer(params.model)
    summary: dict[str, Any] = {"samples": len(examples), "init_adapter": init_adapter}
    tmp_dir = output_dir.with_name(output_dir.name + ".tmp")
    if tmp_dir.exists() and main_process:
        shutil.rmtree(tmp_dir)
    features = [tokenize_example(tokenizer, e["prompt"], e["completion"], tp.max_length, params.model.prompt_format)
                for e in examples]
    # A prompt longer than max_length leaves nothing to learn from: drop it, and say so.
    features = [f for f in features if any(label != IGNORE for label in f["labels"][1:])]
    summary["dropped_no_response_tokens"] = len(examples) - len(features)
    # Seed before the LoRA weights are initialised: the adapter must not depend on what ran
    # earlier in this process (a resumed stage trains in a fresh one).
    set_seed(params.seed)
    if len(features) < tp.min_samples:
        if not main_process:
            return summary
        if init_adapter:
            shutil.copytree(init_adapter, tmp_dir)
        else:
            build_lora_model(params, None).save_pretrained(str(tmp_dir))
        summary.update(trained=False, reason=f"{len(features)} usable samples < training.min_samples={tp.min_samples}")
    else:
        if tp.gpu_memory_fraction and torch.cuda.is_available():  # what a smaller card would allow (benchmarks)
            torch.cuda.set_per_process_memory_fraction(tp.gpu_memory_fraction, int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available():
            # PyTorch picks cuDNN's attention first on Hopper; each call spends ~2.5 ms of CPU on its execution plan,
            # more than the GPU computes at a training set's lengths: FlashAttention's kernel trains the 1.5B 1.5x
            # faster at 1 x 8 (docs/benchmarks.md, "Where a training step's time goes").
            torch.backends.cuda.enable_cudnn_sdp(False)
        model = build_lora_model(params, init_adapter)
        checkpoints = output_dir.parent / f".{output_dir.name}-checkpoints"
        run_name = f"{params.run_name}/{output_dir.parent.parent.name}/{output_dir.name}"  # wandb's, mlflow's run
        with _tensorboard_logging_dir(tensorboard_dir(output_dir)):
            trainer, step_timer = sft_trainer(params, model, tokenizer, features, checkpoints, run_name)
        args = trainer.args
        on_gpu = not args.use_cpu
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        last = last_complete_checkpoint(checkpoints)
        summary["resumed_from"] = last
        result = trainer.train(resume_from_checkpoint=last)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        summary.update(trained=True, steps=result.global_step, seconds=round(time.time() - start, 1),
                       tokens=sum(len(f["input_ids"]) for f in features) * math.ceil(tp.epochs),
                       first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
                       losses=losses, step_seconds=step_timer.seconds,
                       peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None)
        summary["processes"] = args.world_size
        trainer.processing_class = None  # the adapter alone: the tokenizer is the base model's (7 MB for Qwen)
        trainer.save_model(str(tmp_dir))  # gathers FSDP / ZeRO-3 shards; rank 0 writes
        del trainer, model
        if on_gpu:  # hand the GPU back before the stage wakes the run's engine (a batch of 4 peaks at ~57 GiB)
            gc.collect()
            torch.cuda.empty_cache()
        if not main_process:
            return summary
        shutil.rmtree(args.output_dir, ignore_errors=True)
        (tmp_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the adapter is safetensors only
    summary = AdapterTrainingSummary(**summary).model_dump()
    write_json_atomic(tmp_dir / "slkit-train.json", summary)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp_dir.rename(output_dir)
    return summary


def main() -> None:
    """Entry point of one process under `accelerate launch` (see launch_distributed)."""
    parser = argparse.ArgumentParser(description="train one slkit adapter (one process of a distributed run)")
    parser.add_argument("--params", required=True)
    parser.add_argument("--examples", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--init-adapter")
    args = parser.parse_args()
    train_in_this_process(load_params(args.params), args.examples, args.output, args.init_adapter)


if __name__ == "__main__":
    main()
