"""Length constraints as LonGen states them: four kinds, and the word interval each accepts (docs/method.md).

    about T -> [0.8T, 1.2T]; range A-B -> [A, B]; above T -> [T, 1.5T]; below T -> [0.5T, T]

The method's final stage gives a response only a constraint true by this interval (slkit.method.length_control),
and the evaluation scores an answer by its distance from it (slkit.evaluation.benchmarks): one rule for both.
"""
from __future__ import annotations

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
