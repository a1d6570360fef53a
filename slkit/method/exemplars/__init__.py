"""Exemplar writing requests that self-instruct imitates: the ones shipped with slkit (en.txt, zh.txt, one per line) or the user's jsonl."""
from __future__ import annotations

from pathlib import Path

from slkit.method.textstats import detect_language
from slkit.running.records import RecordFileError, read_jsonl

EXEMPLAR_DIR = Path(__file__).parent


def load_shipped_exemplars() -> list[dict[str, str]]:
    exemplars = []
    for language in ("en", "zh"):
        for line in (EXEMPLAR_DIR / f"{language}.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                exemplars.append({"query": line.strip(), "language": language})
    return exemplars


def load_exemplars(exemplar_files: list[str]) -> list[dict[str, str]]:
    """Seeds from jsonl files with a "query" field (language detected when absent), or the shipped ones."""
    if not exemplar_files:
        return load_shipped_exemplars()
    exemplars = []
    for path in exemplar_files:
        for number, record in enumerate(read_jsonl(path, required=["query"]), 1):
            query = record["query"]
            if not isinstance(query, str) or not query.strip():
                raise RecordFileError(f"{path}: record {number}: field query must be a non-empty string")
            exemplars.append({"query": query.strip(), "language": record.get("language") or detect_language(query)})
    if not exemplars:
        raise RecordFileError(f"the exemplar pool is empty: {', '.join(exemplar_files)} hold no queries")
    return exemplars
