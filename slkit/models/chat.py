"""How a user turn is rendered for a model: with the tokenizer's chat template when the model has one, or with
a plain instruction format for base models. Generation, training and every engine render the same way."""
from __future__ import annotations

from typing import Any

PLAIN_TEMPLATE = "Instruction:\n{message}\n\nResponse:\n"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, prompt_format: str = "auto") -> bool:
    """Whether user turns are rendered with the tokenizer's chat template (else the plain format)."""
    return prompt_format == "chat" or (prompt_format == "auto" and has_chat_template(tokenizer))


def render_user_turn(tokenizer: Any, message: str, prompt_format: str = "auto") -> str:
    """The text a model continues to answer `message`: chat template, or the plain format."""
    if uses_chat_template(tokenizer, prompt_format):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return PLAIN_TEMPLATE.format(message=message)


def with_bos(tokenizer: Any, text: str) -> str:
    """`text` starting with the tokenizer's <bos> exactly once (chat templates often include it already);
    encode the result with add_special_tokens=False."""
    bos = tokenizer.bos_token
    return text if not bos or text.startswith(bos) else bos + text
