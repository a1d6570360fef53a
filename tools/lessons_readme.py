"""The README's "Learn the method" examples, from one run: one table or figure per notebook.

    python tools/lessons_readme.py runs/demo            # rewrites README.md between the lessons markers
    python tools/lessons_readme.py runs/demo --print    # prints the block instead

Each example is what the notebook's *What to look for* or *One item* section shows, computed by the same
slkit.lessons functions on the run's last iteration; the evaluation figure is copied to docs/lessons/.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

from slkit.core.layout import load_run_params, stage_dir, stage_summary
from slkit.core.records import read_jsonl
from slkit.evaluation.reports import markdown_table
from slkit.lessons import drafts, extensions, length_control, quality_table, queries, training

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- lessons:begin -->", "<!-- lessons:end -->"


def table(frame, label: str) -> str:
    """A lessons DataFrame as a markdown table, its index (what each row is) the first column, headed `label`."""
    if isinstance(frame.index, pd.RangeIndex):
        return markdown_table(frame)
    names = [label] if frame.index.nlevels == 1 else list(frame.index.names)
    return markdown_table(frame.rename_axis(names).reset_index())


def block(run_dir: Path, figures: Path | None, link: str) -> str:
    """The markdown block; the figure it links is copied into `figures` (None: nothing is written)."""
    params = load_run_params(run_dir)
    k = params.macro_iterations
    out = stage_dir(run_dir, k, "drafts")
    where = f"`{run_dir.name}` run, iteration {k}"
    parts = [f"**00_queries**: what became of the self-instruct candidates ({where}).\n\n"
             + table(queries.rejections(stage_summary(run_dir, k, "queries")), "outcome")]
    draft = drafts.pick(read_jsonl(out / "drafts.jsonl"))
    if draft:
        parts.append(f"**01_drafts**: the quality check on draft `{draft['id']}` ({draft['language']}, accepted at try "
                     f"{draft['tries']}), check by check.\n\n"
                     + table(quality_table(draft["draft"], draft["language"], params.quality), "check"))
    extension = extensions.pick(extensions.kept_extensions(out))
    if extension:
        parts.append(f"**02_extensions**: the micro-iterations of extension `{extension['id']}` "
                     f"({extension['draft_words']} -> {extension['words']} words; every micro-iteration is in its "
                     "`extensions.jsonl` record, the notebook shows each text).\n\n"
                     + table(extensions.micro_iterations_table(extension), ""))
    parts.append(f"**03_training**: both adapters of iteration {k}.\n\n"
                 + table(training.training_table(stage_summary(run_dir, k, "training")).drop(columns=["started from"]), "adapter"))
    figure = stage_dir(run_dir, k, "evaluation") / "required_vs_produced.png"
    if figure.exists():
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(figure, figures / figure.name)
        parts.append(f"**04_evaluation**: required against produced words, every benchmark answer of the baseline "
                     f"and of iteration {k} ({Path(params.evaluation.benchmark or '').name}).\n\n"
                     f"![required vs produced words]({link}/{figure.name})")
    if params.length_control.enabled and (run_dir / "length_control").is_dir():
        final = stage_summary(run_dir, k, "length_control")
        scores = length_control.scores_table(final)
        parts.append("**05_length_control**: the constraint kinds of the pairs against the proportions they were "
                     "drawn with, and the length scores before and after.\n\n"
                     + table(length_control.kinds_table(final, params), "kind")
                     + ("\n" + table(scores, "length score") if not isinstance(scores, str) else ""))
    return "\n\n".join(part.strip() for part in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--print", action="store_true", help="print the block, change no file")
    args = parser.parse_args()
    figures = None if args.print else args.readme.parent / "docs" / "lessons"
    text = block(args.run_dir, figures, "docs/lessons")
    if args.print:
        print(text)
        return
    readme = args.readme.read_text(encoding="utf-8")
    if BEGIN not in readme or END not in readme:
        sys.exit(f"{args.readme}: no {BEGIN} ... {END} block to replace")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    args.readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme), encoding="utf-8")
    print(f"{args.readme}: lessons block from {args.run_dir}")


if __name__ == "__main__":
    main()
