"""The evaluation lesson (notebooks/04_evaluation.ipynb): one benchmark answer scored by the formula, the judge."""
from __future__ import annotations

from pathlib import Path

from IPython.display import Markdown

from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.evaluation.benchmarks import longbench_write_score, longen_score
from slkit.lessons import steps


def score_steps(record: dict) -> str:
    """The score of one benchmark output, computed by the formula with its numbers."""
    words = record["words"]
    if record.get("interval") is not None:  # LonGen; LongBench-Write has none
        a, b = record["interval"]
        if words < a:
            how = f"L = {words} < a = {a:g}: max(2 x {words} / {a:g} - 1, 0)"
        elif words > b:
            how = f"L = {words} > b = {b:g}: max(3 - 2 x {words} / {b:g}, 0)"
        else:
            how = f"L = {words} inside [{a:g}, {b:g}]"
        score = longen_score(words, (a, b))
    else:
        how = f"y = {words}, x = {record['required']:g}"
        score = longbench_write_score(words, record["required"])
    return f"{how} = {score:.3f} (recorded: {record['score']:.3f})"


def pick(records: list[dict]) -> dict | None:
    """The answer the lesson follows: the first query's first sample."""
    return min(records, key=lambda r: (r["index"], r["sample"])) if records else None


def walkthrough(out: Path) -> Markdown:
    """One benchmark item of this run: query, constraint, interval, the answer, its words, the score by the
    formula, and the judge's reply."""
    path = out / "benchmark_outputs.jsonl"
    record = pick(read_jsonl(path)) if path.exists() else None
    if record is None:
        return Markdown("No benchmark output in this run (`evaluation.benchmark`).")
    interval = f", accepted interval [{record['interval'][0]:g}, {record['interval'][1]:g}]" if record.get("interval") is not None else ""
    items: list[tuple[str, str | None]] = [
        (f"Benchmark item {record['index']}, sample {record['sample']} of benchmark_outputs.jsonl "
         f"({record['language']}): constraint type {record['type']}, required {record['required']:g} words{interval}",
         None),
        ("1. The query", record["query"]),
        ("2. The Generator's answer", record["output"]),
        (f"3. Its length by the {record.get('counter', 'benchmark')} counter: {record['words']} words", None),
        (f"4. The length score: {score_steps(record)}", None),
    ]
    judged = out / "judgements.jsonl"
    verdict = next((j for j in read_jsonl(judged) if (j["index"], j["sample"]) == (record["index"], record["sample"]))
                   , None) if judged.exists() else None
    if verdict is None:
        items.append(("5. The judge did not score this answer (judge off, or not among the judged samples)", None))
    elif verdict["failed"]:
        items.append((f"5. The judge's last reply after {verdict['tries']} tries held no valid JSON: counted as failed",
                       verdict["last_reply"]))
    else:
        scores = ", ".join(f"{d} {v:g}" for d, v in verdict["scores"].items())
        items.append((f"5. The judge's scores (try {verdict['tries']}): {scores}; mean {verdict['mean']}", None))
    return steps(items)
