"""The names behind `builtin:` in a recipe: the models slkit ships (as pinned GGUF bytes, or built on the spot).

A param names them (`model.path: builtin:qwen2.5-coder-0.5b-instruct`) and is checked against this list; how
each is fetched, checked and converted is slkit.models (builtin, loading). The builtin benchmarks
(`builtin:lengths-mini`) are slkit.evaluation.benchmarks'.
"""
from __future__ import annotations

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "tiny-random-llama")


def is_builtin(path: str) -> bool:
    return path.startswith(BUILTIN_PREFIX)
