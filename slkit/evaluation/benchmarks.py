"""Length-following evaluation: benchmarks, scores, summaries and length stability.

Each format is scored with the counter its published numbers use (FORMAT_COUNTER): LonGen with
Self-Lengthen's (textstats.count_words, also the method's), LongBench-Write with LongWriter's
(textstats.count_words_longwriter; on Chinese text the first counts 13-14% more: CJK punctuation).
An output record holds "words" by its format's counter and the count of every counter (output_lengths).

- LonGen (docs/method.md): accepted interval [a, b] of slkit.method.constraints: about T -> [0.8T, 1.2T];
  range -> its bounds; above T -> [T, 1.5T]; below T -> [0.5T, T]. Score of a length L in [0, 1]: 1 inside;
  max(2L/a - 1, 0) below; max(3 - 2L/b, 0) above.
- LongBench-Write format (jsonl with prompt, type, length = required words x): score of an output
  of y words in [0, 100]: S_l = 100 max(0, 1 - (y/x - 1)/3) if y > x, else 100 max(0, 1 - (x/y - 1)/2).
- Length stability of a query: the coefficient of variation (population standard deviation / mean)
  of the words of its k samples; reported as the mean over queries, per type and overall.
"""
from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

from datasets import load_dataset

from slkit.core.builtins import BUILTIN_PREFIX
from slkit.core.records import RecordFileError, read_jsonl_lines
from slkit.method.constraints import LONGEN_TYPES, accepted_interval
from slkit.method.textstats import count_words, count_words_longwriter, detect_language

LONGEN_FIELDS = ("language", "range", "type", "constraint", "query")
LONGBENCH_WRITE_FIELDS = ("prompt", "type", "length")
# LongWriter's length bins of the required length, in words.
LENGTH_BINS = ((0, 500, "<500"), (500, 2000, "500-2k"), (2000, 4000, "2k-4k"), (4000, math.inf, ">=4k"))
SCALES = {"longen": 1.0, "longbench_write": 100.0}  # a perfect score on each benchmark
COUNTERS = {"slkit": count_words, "longwriter": count_words_longwriter}
FORMAT_COUNTER = {"longen": "slkit", "longbench_write": "longwriter"}  # the counter each benchmark scores with


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


def longbench_write_score(produced: float, required: float) -> float:
    """S_l of LongBench-Write, in [0, 100]."""
    y, x = produced, required
    if y > x:
        return 100 * max(0.0, 1 - (y / x - 1) / 3)
    if y <= 0:
        return 0.0
    return 100 * max(0.0, 1 - (x / y - 1) / 2)


def length_bin(words: float) -> str:
    return next(name for low, high, name in LENGTH_BINS if low <= words < high)


# Benchmarks shipped as package data (slkit/evaluation/builtin/), in LonGen's format.
BUILTIN_BENCHMARKS = {"lengths-mini": "lengths-mini.jsonl"}  # 48 queries, en/zh, 100-800 words, LonGen's 4 types
LONGEN_HUB_ID = "quanshr/LonGen"  # LonGen on the Hugging Face hub (one split, test)


def locate_benchmark(source: str, base: Path | None = None) -> str:
    """Where a benchmark is: the absolute path of a builtin or a local jsonl file (relative to `base`,
    else the working directory), or the hub id "org/name[:split]" unchanged. The one place that decides."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_BENCHMARKS:
            raise RecordFileError(f"unknown builtin benchmark {source!r}; known: "
                                  + ", ".join(BUILTIN_PREFIX + b for b in BUILTIN_BENCHMARKS))
        return str(Path(__file__).resolve().parent / "builtin" / BUILTIN_BENCHMARKS[name])
    local = Path(source).expanduser()
    local = local if local.is_absolute() or base is None else base / local
    if local.exists():
        return str(local.resolve())
    if source.startswith(("/", ".", "~")) or "/" not in source or source.endswith((".jsonl", ".json")):
        raise RecordFileError(f"{source}: no such benchmark file (and not a hub id org/name[:split])")
    return source


def is_hub_id(location: str) -> bool:
    return not Path(location).is_absolute()


def _rows(source: str) -> list[tuple[str, dict]]:
    """(where, row) of a jsonl file (where = file:line) or of a `datasets` hub id "org/name[:split]"
    (a dataset with one split needs no split name)."""
    location = locate_benchmark(source)
    if not is_hub_id(location):
        return [(f"{source}:{n}", r) for n, r in read_jsonl_lines(Path(location))]  # malformed JSON: file:line
    name, _, split = location.partition(":")
    if split:
        dataset = load_dataset(name, split=split)
    else:
        splits = load_dataset(name)
        if len(splits) != 1:
            raise RecordFileError(f"{source}: the dataset has splits {', '.join(splits)}; name one as {name}:SPLIT")
        dataset = next(iter(splits.values()))
    return [(f"{source} (row {i + 1})", dict(r)) for i, r in enumerate(dataset)]


def _benchmark_item(where: str, row: dict, fmt: str) -> dict:
    """One benchmark query in slkit's common form: query, language, type, bin, interval/required."""
    fields = LONGEN_FIELDS if fmt == "longen" else LONGBENCH_WRITE_FIELDS
    missing = [k for k in fields if k not in row]
    if missing:
        raise RecordFileError(f"{where}: missing field(s) {', '.join(missing)} of the {fmt} format")
    try:
        if fmt == "longen":
            interval = longen_interval(row["type"], row["constraint"])
            return {"query": row["query"], "language": row["language"], "type": row["type"], "bin": row["range"],
                    "interval": interval, "required": (interval[0] + interval[1]) / 2}
        required = row["length"]
        if isinstance(required, bool) or not isinstance(required, (int, float)) or required <= 0:
            raise ValueError(f"length must be a positive number of words, got {required!r}")
        return {"query": row["prompt"], "language": detect_language(row["prompt"]), "type": str(row["type"]),
                "bin": length_bin(required), "required": float(required)}
    except ValueError as err:
        raise RecordFileError(f"{where}: {err}") from None


def load_benchmark(source: str, fmt: str = "auto") -> tuple[str, list[dict]]:
    """(format, items) of a LonGen or LongBench-Write benchmark, from a jsonl path or a hub id.
    fmt auto: LonGen when the first record has LonGen's fields, else LongBench-Write."""
    rows = _rows(source)
    if not rows:
        raise RecordFileError(f"{source}: the benchmark holds no records")
    if fmt == "auto":
        fmt = "longen" if all(k in rows[0][1] for k in LONGEN_FIELDS) else "longbench_write"
    return fmt, [_benchmark_item(where, row, fmt) for where, row in rows]


def load_longen(path: str) -> list[dict]:
    """LonGen items; a record with a missing field, unknown type or unusable constraint names file and line."""
    return load_benchmark(path, "longen")[1]


def output_lengths(text: str, fmt: str) -> dict:
    """An output's length fields: "words" by the format's counter (what it is scored on), "counter" its
    name, and "words_<name>" by every counter."""
    counts = {f"words_{name}": count(text) for name, count in COUNTERS.items()}
    return {"words": counts[f"words_{FORMAT_COUNTER[fmt]}"], "counter": FORMAT_COUNTER[fmt], **counts}


def score_length(item: dict, words: float, fmt: str) -> float:
    """The benchmark's own length score of an output of `words` words for `item`."""
    if fmt == "longen":
        return longen_score(words, item["interval"])
    return longbench_write_score(words, item["required"])


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


def _grouped_means(rows: list[dict], value: str, key: str) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        groups[str(r[key])].append(r[value])
    order = [t for t in LONGEN_TYPES if t in groups] + sorted(k for k in groups if k not in LONGEN_TYPES)
    if key == "bin":
        names = [name for _, _, name in LENGTH_BINS]
        order = sorted(groups, key=lambda k: (names.index(k) if k in names else len(names), k))
    return {k: round(mean(groups[k]), 4) for k in order}


def summarize_scores(scored: list[dict]) -> dict:
    """Mean score overall, per type, per length bin and per language, from records with
    "type", "bin", "language", "score" (every sample counts once)."""
    return {
        "overall": round(mean(r["score"] for r in scored), 4) if scored else float("nan"),
        "per_type": _grouped_means(scored, "score", "type"),
        "per_length_bin": _grouped_means(scored, "score", "bin") if all("bin" in r for r in scored) else {},
        "per_language": _grouped_means(scored, "score", "language"),
        "n": len(scored),
    }


def length_stability(scored: list[dict]) -> dict | None:
    """Coefficient of variation of each query's produced words over its samples (records grouped by
    "index"); the mean over queries overall and per type. None when no query has 2+ samples."""
    by_query: dict[int, list[dict]] = defaultdict(list)
    for r in scored:
        by_query[r["index"]].append(r)
    rows = []
    for index, samples in sorted(by_query.items()):
        words = [s["words"] for s in samples]
        if len(words) >= 2 and mean(words) > 0:
            rows.append({"index": index, "type": samples[0]["type"], "cv": pstdev(words) / mean(words)})
    if not rows:
        return None
    return {"overall_cv": round(mean(r["cv"] for r in rows), 4), "per_type_cv": _grouped_means(rows, "cv", "type"),
            "queries": len(rows), "samples_per_query": max(len(v) for v in by_query.values()),
            "per_query": {r["index"]: round(r["cv"], 4) for r in rows}}
