"""Training examples as token ids: the prompt rendered as the model sees it at generation time, loss on the
response tokens only (TRL's trainer pads them into batches)."""
from __future__ import annotations

from typing import Any

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
