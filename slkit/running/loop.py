"""Self-Lengthen's loop, as `slkit run` runs it (docs/method.md; the README's "The loop").

A Generator drafts answers, an Extender lengthens them, both are fine-tuned on the lengthened texts, and the loop
starts again with the new adapters; a final stage teaches the Generator to follow length constraints. Each step is
a stage of slkit.core.registry: its notebook (notebooks/NN_<stage>.ipynb) calls slkit.stages.<stage> and shows
what it did, in runs/<run>/baseline/, iter_<k>/ or length_control/.

How a step runs is slkit.running.pipeline's: the recipe checked and the run directory held by this run alone, a
stage done before skipped (a rerun resumes), the run's vLLM server around the stages, each notebook under papermill.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from slkit.core.layout import BASELINE
from slkit.core.params import Params
from slkit.running.pipeline import run_stages, started_run


def self_lengthen(params: Params) -> Iterator[tuple[int, str]]:
    """The loop's steps in order, each an (iteration, stage)."""
    if params.evaluation.baseline and params.evaluation.benchmark:
        yield BASELINE, "evaluation"  # the untrained model answers the benchmark: iteration 0 of every table
    for k in range(1, params.macro_iterations + 1):  # iteration k generates with iteration k-1's adapters
        yield k, "queries"  # self-instruct writes new writing requests; a judge and a length filter keep fit ones
        yield k, "drafts"  # the Generator answers each query; answers that fail the quality check are retried
        yield k, "extensions"  # drafts resampled by length; the Extender lengthens each, kept when 1.2x longer
        yield k, "training"  # extensions resampled by length fine-tune the Generator and the Extender
        yield k, "evaluation"  # the new Generator answers the benchmark: length scores, stability, judge
    if params.length_control.enabled:
        # once, after the last iteration: long answers get a length constraint they meet; a last Generator learns it
        yield params.macro_iterations, "length_control"


def run_loop(params_path: str | Path, overrides: dict[str, Any] | None = None, show_progress: bool = True) -> Path:
    """`slkit run`: every step of the loop not done before, in order; returns the run directory."""
    with started_run(params_path, overrides) as run:
        run_stages(run, list(self_lengthen(run.params)), show_progress)
    return run.dir
