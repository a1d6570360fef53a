"""The exemplar writing requests slkit ships (en.txt, zh.txt, one per line): data two layers read.

Self-instruct imitates them when a recipe names no exemplar files of its own (slkit.method.exemplars), and the
tiny random test model's tokenizer is trained on their text (slkit.models.loading), so they sit below both.
"""
from __future__ import annotations

from pathlib import Path

EXEMPLAR_DIR = Path(__file__).parent


def load_shipped_exemplars() -> list[dict[str, str]]:
    exemplars = []
    for language in ("en", "zh"):
        for line in (EXEMPLAR_DIR / f"{language}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                exemplars.append({"query": line.strip(), "language": language})
    return exemplars
