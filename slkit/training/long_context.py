"""Memory techniques for long training samples (16k-32k tokens on one 24 GB GPU) that TRL does not have.

TRL's SFTTrainer already never holds full-sequence logits (16k tokens x 152k vocab x 4 B = 10 GB for Qwen2:
its LM head is fused with the loss) and offloads activations (slkit.training.trainer). Added here:
- tile_mlps: the MLP of each layer runs over token tiles, checkpointed, so its 4x-wide activations exist
  for one tile at a time (training.mlp_tile_tokens).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # the label of a token the loss skips (prompt and padding), as in transformers


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
