"""The stage registry: every stage of the loop, in order, with what it reads, writes and is tuned by.

One word per concept: a stage's name is its notebook's (`NN_<name>.ipynb`), its module's
(`slkit.stages.<name>`, function `<name>_stage`), its params section's (where it has one) and its done-marker's
(`<name>.done.json`). The pipeline finds each stage's notebook here, and the README's loop table comes from
here; the loop (slkit.running.loop) runs the stages in this order (tests/test_architecture.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    reads: tuple[str, ...]  # files of the iteration directory (or of earlier ones, said in the text)
    writes: tuple[str, ...]
    params: tuple[str, ...]  # params sections that change what it does
    summary: str  # what it does, in one line
    per_iteration: bool = True  # False: once, after the last macro-iteration (in runs/<run>/<name>/)

    @property
    def module(self) -> str:
        return f"slkit.stages.{self.name}"

    @property
    def function(self) -> str:
        return f"{self.name}_stage"


STAGES: tuple[Stage, ...] = (
    Stage("queries", "00_queries.ipynb", reads=("exemplars", "earlier iterations' queries.jsonl"),
          writes=("queries.jsonl",), params=("queries", "sampling"),
          summary="self-instruct writes new writing requests; a judge and a length filter keep the fit ones"),
    Stage("drafts", "01_drafts.ipynb", reads=("queries.jsonl",), writes=("drafts.jsonl",),
          params=("drafts", "quality", "sampling"),
          summary="the Generator answers each query; answers that fail the quality check are retried"),
    Stage("extensions", "02_extensions.ipynb", reads=("drafts.jsonl",),
          writes=("resampled_drafts.jsonl", "extensions.jsonl"), params=("extensions", "resampling", "quality", "sampling"),
          summary="drafts resampled by length; the Extender lengthens each in two phases, kept when 1.2x longer"),
    Stage("training", "03_training.ipynb", reads=("extensions.jsonl",),
          writes=("resampled_extensions.jsonl", "generator_sft.jsonl", "extender_sft.jsonl", "adapters/"),
          params=("training", "resampling"),
          summary="extensions resampled by length train the Generator and the Extender (LoRA or QLoRA)"),
    Stage("evaluation", "04_evaluation.ipynb", reads=("adapters/", "the benchmark"),
          writes=("benchmark_outputs.jsonl", "judgements.jsonl", "evaluation.json", "*.png"), params=("evaluation",),
          summary="the Generator answers the benchmark: length scores, stability, judge, filters, repetition"),
    Stage("length_control", "05_length_control.ipynb", reads=("every iteration's resampled_drafts.jsonl and "
                                                                   "resampled_extensions.jsonl",),
          writes=("constrained.jsonl", "constrained.json", "generator_sft.jsonl", "adapters/generator", "length_control.json"),
          params=("length_control",), per_iteration=False,
          summary="long answers get a length constraint they meet; a last Generator learns to follow it"),
)

ITERATION_STAGES = tuple(stage.name for stage in STAGES if stage.per_iteration)
BY_NAME = {stage.name: stage for stage in STAGES}


def loop_table() -> str:
    """The README's table of the loop, one row per stage (tests/test_architecture.py keeps the README in step)."""
    rows = ["| stage | notebook | reads | writes | params | what it does |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        rows.append(f"| `{stage.name}`{'' if stage.per_iteration else ' (final)'} | `{stage.notebook}` | "
                    f"{', '.join(stage.reads)} | {', '.join(f'`{w}`' for w in stage.writes)} | "
                    f"{', '.join(f'`{p}`' for p in stage.params)} | {stage.summary} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(loop_table())
