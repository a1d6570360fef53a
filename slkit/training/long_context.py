"""Memory techniques for long training samples (16k-32k tokens on one 24 GB GPU).

- chunked_causal_lm_loss: the LM head runs on response tokens only, a chunk at a time, recomputed in
  backward, so full-sequence logits (16k tokens x 152k vocab x 4 B = 10 GB for Qwen2) never exist.
- Liger's fused linear cross-entropy as the alternative loss (training.loss: liger).
- tile_mlps: the MLP of each layer runs over token tiles, checkpointed, so its 4x-wide activations exist
  for one tile at a time.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of a token the loss skips (prompt and padding), as in transformers


def chunked_causal_lm_loss(hidden, lm_head, labels, chunk_tokens: int = 2048, softcap: float | None = None,
                           num_items: int | None = None):
    """Next-token cross-entropy without full-sequence logits.

    hidden: (B, T, H) last hidden states; labels: (B, T) with -100 on ignored positions. Only
    positions with a label are projected; each chunk's fp32 logits are recomputed in backward
    (non-reentrant checkpoint) instead of being stored. Returns the sum divided by `num_items`
    (the number of label tokens when None), so gradient accumulation stays exact.
    """

    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    y = targets[keep]
    if num_items is None:
        num_items = int(y.numel())

    def chunk_loss(h_chunk, y_chunk):
        logits = lm_head(h_chunk).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, y_chunk, reduction="sum")

    total = hidden[:, :0].sum().float()  # zero that keeps the graph when no position has a label
    for start in range(0, y.numel(), chunk_tokens):
        total = total + checkpoint(chunk_loss, h[start:start + chunk_tokens], y[start:start + chunk_tokens],
                                   use_reentrant=False)
    return total / max(1, int(num_items))


def backbone_and_head(model: Any):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)


def liger_loss(hidden, head, labels, num_items):
    try:  # optional (the gpu extra, CUDA only), hence imported here
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise RuntimeError("training.loss: 'liger' needs the liger-kernel package (CUDA only): "
                           "pip install liger-kernel, or use loss: chunked") from None
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    loss_sum = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, h, targets)
    return loss_sum / max(1, num_items or int((targets != IGNORE).sum()))


def tile_mlps(model: Any, tile_tokens: int) -> int:
    """Run every MLP block over the sequence in tiles of `tile_tokens`, each under its own checkpoint.

    An MLP acts on each position alone, so tiling is exact; in backward only one tile's
    intermediate activations (tile x intermediate_size, several tensors) exist instead of the
    whole sequence's. Returns the number of MLPs tiled.
    """

    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("MLP") and hasattr(module, "down_proj"):
            def forward(x, _inner=module.forward):
                if x.shape[-2] <= tile_tokens or not torch.is_grad_enabled():
                    return _inner(x)
                return torch.cat([checkpoint(_inner, part, use_reentrant=False)
                                  for part in x.split(tile_tokens, dim=-2)], dim=-2)
            module.forward = forward
            count += 1
    return count
