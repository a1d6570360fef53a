"""Exemplar writing requests that self-instruct imitates: the ones shipped with slkit (slkit.core.exemplars) or the
user's jsonl."""
from __future__ import annotations

from slkit.core.exemplars import load_shipped_exemplars
from slkit.core.records import RecordFileError, read_jsonl
from slkit.method.textstats import detect_language


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
