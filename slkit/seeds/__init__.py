"""Seed long-writing instructions: the ones shipped with slkit (en.txt, zh.txt, one per line) or the user's jsonl."""
from __future__ import annotations

from pathlib import Path

from slkit.records import RecordFileError, read_jsonl
from slkit.textstats import detect_language

SEED_DIR = Path(__file__).parent


def load_shipped_seeds() -> list[dict[str, str]]:
    seeds = []
    for language in ("en", "zh"):
        for line in (SEED_DIR / f"{language}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                seeds.append({"query": line.strip(), "language": language})
    return seeds


def load_seeds(seed_files: list[str]) -> list[dict[str, str]]:
    """Seeds from jsonl files with a "query" field (language detected when absent), or the shipped ones."""
    if not seed_files:
        return load_shipped_seeds()
    seeds = []
    for path in seed_files:
        for number, record in enumerate(read_jsonl(path, required=["query"]), 1):
            query = record["query"]
            if not isinstance(query, str) or not query.strip():
                raise RecordFileError(f"{path}: record {number}: field query must be a non-empty string")
            seeds.append({"query": query.strip(), "language": record.get("language") or detect_language(query)})
    if not seeds:
        raise RecordFileError(f"the seed pool is empty: {', '.join(seed_files)} hold no queries")
    return seeds
