"""transformers' Trainer with slkit's loss: the chunked cross-entropy (or Liger's fused one, or the model's own),
activation offloading to CPU, and a step timer for tokens/s."""
from __future__ import annotations

import time
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from slkit.training.long_context import backbone_and_head, chunked_causal_lm_loss, liger_loss


class LengthTrainer(Trainer):
    """Trainer whose loss is chunked (default), Liger's fused linear cross-entropy, or the model's own."""

    def __init__(self, *args: Any, loss_kind: str = "chunked", loss_chunk_tokens: int = 2048,
                 activation_offload: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_kind, self.loss_chunk_tokens = loss_kind, loss_chunk_tokens
        self.activation_offload = activation_offload
        self.model_accepts_loss_kwargs = True  # our loss divides by num_items_in_batch itself

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.activation_offload:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        # Tensors autograd keeps for backward (with checkpointing: each layer's input) wait in
        # pinned CPU memory and come back to the GPU when backward reaches them.
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return self._loss(model, inputs, return_outputs, num_items_in_batch)

    def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        # num_items_in_batch counts every process's tokens; DDP averages gradients over processes,
        # so each process's loss is scaled back up (what Trainer.compute_loss does).
        scale = (self.accelerator.num_processes
                 if self.args.average_tokens_across_devices and num_items_in_batch is not None else 1)
        if self.loss_kind == "model":
            out = model(**inputs, labels=labels, num_items_in_batch=num_items_in_batch)
            return (out.loss * scale, out) if return_outputs else out.loss * scale
        inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                      num_items=int(num_items_in_batch) if num_items_in_batch is not None else None)
        inner = self.accelerator.unwrap_model(model)
        if inner is model:
            loss = self._head_loss(model, **inputs)
        else:  # DDP / FSDP / ZeRO wrap the model: the loss must run inside the wrapper's forward to sync
            inner.forward = lambda **kw: self._head_loss(inner, **kw)
            try:
                loss = model(**inputs)
            finally:
                del inner.forward
        loss = loss * scale
        return (loss, None) if return_outputs else loss

    def _head_loss(self, model, input_ids, attention_mask, labels, num_items):
        """The backbone's hidden states, then the loss over the LM head without full fp32 logits."""
        backbone, head, softcap = backbone_and_head(model)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.loss_kind == "liger":
            return liger_loss(hidden, head, labels, num_items)
        return chunked_causal_lm_loss(hidden, head, labels, self.loss_chunk_tokens, softcap, num_items)


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
