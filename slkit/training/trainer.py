"""TRL's SFTTrainer, set up from slkit's training params, with two callbacks of slkit's own.

TRL computes the loss through a fused LM head (full-vocabulary logits never exist for the whole sequence),
offloads activations to CPU on a side stream (training.activation_offload) and applies Liger's kernels through
transformers' public switch (training.liger_kernels). On an H200 it used 12-25% less memory and ran 16-34%
faster than slkit's former trainer at 16k and 32k tokens (docs/benchmarks.md), so slkit uses it. slkit still
tokenizes the examples itself (the prompt exactly as generation renders it, loss on the response only: see
slkit.training.batches) and hands TRL the token ids and labels.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available
from transformers.utils import is_liger_kernel_available
from trl import SFTConfig, SFTTrainer

from slkit.core.params import Params
from slkit.training.long_context import tile_mlps

# Liger's layer kernels; TRL keeps its own fused LM head, so Liger's fused cross-entropy stays off.
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


def checkpointing_args(training_arguments: type, enabled: bool) -> dict[str, Any]:
    """TrainingArguments' activation checkpointing keywords: transformers 5.23 renamed gradient_checkpointing
    to activation_checkpointing (the old name is deprecated there), and the GPU image has 5.17, which knows only
    the old one (a TypeError at the training stage)."""
    names = {f.name for f in dataclasses.fields(training_arguments)}
    kind = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{kind}_checkpointing": enabled, f"{kind}_checkpointing_kwargs": {"use_reentrant": False}}


def reporting_integrations(report_to: str | list[str]) -> list[str]:
    """training.report_to as transformers' list of integrations ([] for "none")."""
    return [] if report_to == "none" else [report_to] if isinstance(report_to, str) else list(report_to)


def unavailable_integrations(report_to: str | list[str]) -> list[str]:
    """The integrations of training.report_to whose package is not installed (Trainer would fail on them
    after the stages before training have run)."""
    installed = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    return [name for name in reporting_integrations(report_to) if not installed[name]()]


def sft_config(params: Params, checkpoints: Path, run_name: str, on_gpu: bool) -> SFTConfig:
    """TRL's configuration for one adapter's training from params.training."""
    tp = params.training
    if tp.liger_kernels and not is_liger_kernel_available():
        raise RuntimeError("training.liger_kernels needs the liger-kernel package (CUDA only): pip install "
                           "'slkit[gpu]', or set it to false")
    return SFTConfig(
        output_dir=str(checkpoints), save_steps=tp.save_steps or 500,
        per_device_train_batch_size=tp.batch_size, gradient_accumulation_steps=tp.gradient_accumulation,
        num_train_epochs=tp.epochs, learning_rate=tp.learning_rate, lr_scheduler_type=tp.lr_scheduler,
        warmup_steps=tp.warmup_ratio, optim=tp.optimizer, logging_steps=1,
        save_strategy="steps" if tp.save_steps else "no",
        save_total_limit=2,  # a kill while saving leaves the one before complete; older ones are dead weight
        report_to=reporting_integrations(tp.report_to) or "none", run_name=run_name,  # wandb's, mlflow's run
        remove_unused_columns=False, seed=params.seed, disable_tqdm=True,
        bf16=on_gpu and params.model.dtype in ("bfloat16", "auto"), fp16=on_gpu and params.model.dtype == "float16",
        use_cpu=not on_gpu, dataloader_pin_memory=on_gpu,
        max_length=tp.max_length, packing=False, loss_type="nll",
        train_sampling_strategy="group_by_length" if tp.group_by_length else "random",
        activation_offloading=tp.activation_offload and on_gpu,  # TRL's offloading overlaps copies on CUDA streams
        use_liger_kernel=tp.liger_kernels, liger_kernel_config=LIGER_KERNELS if tp.liger_kernels else None,
        **checkpointing_args(SFTConfig, tp.gradient_checkpointing),
        ddp_find_unused_parameters=False)  # LoRA freezes the base: DDP must not look for unused weights


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step (CUDA-synchronised), for tokens/s."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._sync()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(round(self._sync() - self._start, 4))


class TileMLPs(TrainerCallback):
    """training.mlp_tile_tokens: tile every MLP when training begins, after transformers has applied Liger's
    kernels (which replace the MLPs' forward and would drop a tiling done before)."""

    def __init__(self, tile_tokens: int):
        self.tile_tokens, self.tiled = tile_tokens, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.tiled = tile_mlps(model, self.tile_tokens)


def sft_trainer(params: Params, model: Any, tokenizer: Any, features: list[dict[str, list[int]]],
                checkpoints: Path, run_name: str) -> tuple[SFTTrainer, StepTimer]:
    """TRL's trainer on slkit's tokenized examples (input_ids and labels: TRL takes them as they are), with a
    step timer (returned too) and, when asked, MLP tiling."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    args = sft_config(params, checkpoints, run_name, on_gpu)
    if "LOCAL_RANK" not in os.environ:
        args._n_gpu = 1  # one process trains on one GPU; Trainer would wrap nn.DataParallel on a multi-GPU host
    callbacks = [timer := StepTimer()]
    if params.training.mlp_tile_tokens:
        callbacks.append(TileMLPs(params.training.mlp_tile_tokens))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(features),
                         processing_class=tokenizer, callbacks=callbacks)
    return trainer, timer
