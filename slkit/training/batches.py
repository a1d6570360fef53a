"""Training examples as token ids: the prompt rendered as the model sees it at generation time, loss on the
response tokens only; batches right-padded."""
from __future__ import annotations

from typing import Any

import torch

from slkit.models.chat import render_user_turn, with_bos
from slkit.training.long_context import IGNORE


def tokenize_example(tokenizer: Any, prompt: str, completion: str, max_length: int,
                     prompt_format: str = "auto") -> dict[str, list[int]]:
    """input_ids and labels for one (prompt, completion) pair: loss on response tokens only, cut at max_length."""
    rendered = with_bos(tokenizer, render_user_turn(tokenizer, prompt, prompt_format))
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(features: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
