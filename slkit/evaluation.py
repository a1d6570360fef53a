"""Length-following evaluation: LonGen (METHOD.md formula) and summary metrics of a run.

LonGen accepted interval [a, b]: about T -> [0.8T, 1.2T]; range -> its bounds; above T -> [T, 1.5T];
below T -> [0.5T, T]. Score of a length L: 1 inside; max(2L/a - 1, 0) below; max(3 - 2L/b, 0) above.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from statistics import mean

from slkit.records import RecordFileError, read_jsonl

LONGEN_FIELDS = ("language", "range", "type", "constraint", "query")
LONGEN_TYPES = ("about", "range", "above", "below")


def accepted_interval(kind: str, numbers: list[int]) -> tuple[float, float]:
    """The accepted word interval of a constraint kind given its numbers (about/above/below: [T]; range: [A, B])."""
    if kind == "range":
        return float(min(numbers[:2])), float(max(numbers[:2]))
    t = numbers[0]
    if kind == "about":
        return 0.8 * t, 1.2 * t
    if kind == "above":
        return float(t), 1.5 * t
    if kind == "below":
        return 0.5 * t, float(t)
    raise ValueError(f"unknown LonGen type {kind!r}; expected one of {', '.join(LONGEN_TYPES)}")


def longen_interval(kind: str, constraint: str) -> tuple[float, float]:
    """The accepted word interval of a LonGen constraint, e.g. ('about', 'around 2000 words') -> (1600, 2400)."""
    numbers = [int(n) for n in re.findall(r"\d+", constraint.replace(",", ""))]
    if not numbers or (kind == "range" and len(numbers) < 2):
        raise ValueError(f"constraint {constraint!r} does not hold the numbers a {kind!r} constraint needs")
    return accepted_interval(kind, numbers)


def longen_score(length: float, interval: tuple[float, float]) -> float:
    a, b = interval
    if length < a:
        return max(2 * length / a - 1, 0.0)
    if length > b:
        return max(3 - 2 * length / b, 0.0)
    return 1.0


def load_longen(path: str) -> list[dict]:
    """LonGen records; a line with a missing field, unknown type or unusable constraint names file and line."""
    records = read_jsonl(path, required=LONGEN_FIELDS)
    for number, r in enumerate(records, 1):
        try:
            r["interval"] = longen_interval(r["type"], r["constraint"])
        except ValueError as err:
            raise RecordFileError(f"{path}: record {number}: {err}") from None
    return records


def stratified_subset(records: list[dict], size: int, seed: int) -> list[dict]:
    """`size` records spread evenly over (language, type), drawn reproducibly."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["language"], r["type"]].append(r)
    rng = random.Random(seed)
    for g in groups.values():
        rng.shuffle(g)
    keys = sorted(groups)
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < min(size, len(records)):
        for k in keys:
            if depth < len(groups[k]) and len(chosen) < size:
                chosen.append(groups[k][depth])
        depth += 1
    return chosen


def summarize_scores(scored: list[dict]) -> dict:
    """Mean score overall, per type and per language, from records with "type", "language", "score"."""
    def avg(rows: list[dict]) -> float:
        return round(mean(r["score"] for r in rows), 4) if rows else float("nan")

    return {
        "overall": avg(scored),
        "per_type": {t: avg([r for r in scored if r["type"] == t]) for t in LONGEN_TYPES if any(r["type"] == t for r in scored)},
        "per_language": {lang: avg([r for r in scored if r["language"] == lang]) for lang in sorted({r["language"] for r in scored})},
        "n": len(scored),
    }
