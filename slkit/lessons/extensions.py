"""The extensions lesson (notebooks/02_extensions.ipynb): one draft through the two-phase extension, micro-iteration
by micro-iteration.

Every micro-iteration of a kept job is in its extensions.jsonl record (`micro_iterations`,
slkit.method.extensions.micro_iteration_trace): the phase-1 output, how many of its paragraphs were kept, the
continuation, the words and the verdict. The rest is rebuilt here the way extend_drafts built it: each try starts
from the draft, an accepted micro-iteration's text is the next one's input, the phase-1 prompt is the template
over the input's former half, phase 2's the template over the whole input, pre-filled with the kept head.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from IPython.display import Markdown
from matplotlib.figure import Figure

from slkit.core.params import Params
from slkit.core.records import read_records
from slkit.core.schema import ExtensionRecord, micro_iteration_verdict_counts
from slkit.lessons import counts_table, steps
from slkit.method.extensions import first_paragraphs, former_part, phase2_prefill, phase2_text
from slkit.method.prompts import extension_prompt
from slkit.method.textstats import count_words


def replay(record: dict) -> list[dict]:
    """Each micro-iteration of an extension record with the texts it worked on: its input, the phase-1 prompt,
    the kept head, the pre-fill, the phase-2 prompt and the new text, next to what the record holds."""
    query, language = record["query"], record["language"]
    shown, current, try_index = [], record["draft"], None
    best = record["draft_words"]
    for r in record["micro_iterations"]:
        if r["try_index"] != try_index:  # each try starts again from the draft
            try_index, current, best = r["try_index"], record["draft"], record["draft_words"]
        kept = first_paragraphs(r["phase1"], r["kept_paragraphs"])
        new_text = phase2_text(kept, r["continuation"])
        shown.append({**r, "input": current, "input_words": count_words(current), "best_before": best,
                      "phase1_prompt": extension_prompt(query, former_part(current), language),
                      "phase1_paragraphs": len(r["phase1"].split("\n\n")), "kept": kept,
                      "prefill": phase2_prefill(kept),
                      "phase2_prompt": extension_prompt(query, current, language), "new_text": new_text})
        if r["verdict"] == "accepted":
            current, best = new_text, r["words"]
    return shown


def micro_iterations_table(record: dict) -> pd.DataFrame:
    """One row per micro-iteration of an extension record: words in, paragraphs kept, words of the continuation
    and of the new text, the best so far and the verdict."""
    rows = [{"try": r["try_index"], "micro-iteration": r["micro_iteration"], "input words": r["input_words"],
             "phase-1 words": count_words(r["phase1"]),
             "kept paragraphs": f"{r['kept_paragraphs']} of {r['phase1_paragraphs']}",
             "continuation words": count_words(r["continuation"]), "new words": r["words"],
             "best before": r["best_before"], "verdict": r["verdict"]} for r in replay(record)]
    return pd.DataFrame(rows).set_index(["try", "micro-iteration"])


def kept_extensions(out: Path) -> list[dict]:
    """The records of extensions.jsonl (the kept jobs); an older run's under today's field names."""
    return read_records(out / "extensions.jsonl", ExtensionRecord)


def pick(records: list[dict]) -> dict | None:
    """The extension the lesson follows: the one with the most micro-iterations (the most to show), first by id."""
    return min(records, key=lambda r: (-len(r.get("micro_iterations", [])), r["id"])) if records else None


def walkthrough(record: dict, params: Params, max_micro_iterations: int = 4) -> Markdown:
    """The first `max_micro_iterations` micro-iterations of one extension, text by text, then the length rule on
    its best text."""
    if not record.get("micro_iterations"):
        return Markdown(f"Record `{record['id']}` predates the recorded micro-iterations: rerun the stage to see "
                        "them.")
    items: list[tuple[str, str | None]] = [
        (f"Record `{record['id']}` of extensions.jsonl: job {record['sample']} of draft `{record['draft_id']}` "
         f"({record['language']}, {record['draft_words']} words), kept at try {record['tries']}", None),
        ("The request", record["query"])]
    shown = replay(record)
    for r in shown[:max_micro_iterations]:
        head = f"Try {r['try_index']}, micro-iteration {r['micro_iteration']}"
        items += [
            (f"{head}. Its input text", r["input"]),
            (f"{head}. 1. The phase-1 prompt (the template over the input's former half)", r["phase1_prompt"]),
            (f"{head}. 2. What the Extender wrote in phase 1", r["phase1"]),
            (f"{head}. 3. The kept head: {r['kept_paragraphs']} of its {r['phase1_paragraphs']} paragraphs", r["kept"]),
            (f"{head}. 4. Phase 2: the template over the whole input, and the pre-fill the answer starts with",
             r["phase2_prompt"] + "\n\n[answer pre-filled with:]\n\n" + r["prefill"]),
            (f"{head}. 5. The continuation the Extender wrote after the pre-fill", r["continuation"]),
            (f"{head}. 6. New text = kept head + continuation: {r['words']} words against {r['best_before']} "
             f"before; verdict: {r['verdict']}", None),
        ]
    if len(shown) > max_micro_iterations:
        items.append((f"... {len(shown) - max_micro_iterations} more micro-iteration(s): see the table below", None))
    items.append((f"The length rule: {record['words']} words > {params.extensions.min_ratio} x "
                  f"{record['draft_words']} = {params.extensions.min_ratio * record['draft_words']:.1f}: kept "
                  f"(ratio {record['ratio']})", None))
    return steps(items)


def jobs_summary(summary: dict) -> Markdown:
    """What happened to every job of the stage, failed ones included (they leave no record, only counts)."""
    c = summary.get("counts", {})
    return Markdown(
        f"{summary['drafts']} drafts, {summary['resampled_drafts']} kept by the resampling, {summary['jobs']} "
        f"extension jobs: **{summary['extensions']} kept**, {c.get('gave_up', 0)} gave up after their last "
        f"try, {c.get('retried', 0)} restarts from the draft along the way. Failed jobs write no record; why "
        f"their micro-iterations failed is in the micro-iteration verdicts below (all jobs, kept or not).")


def micro_iteration_verdicts(summary: dict) -> pd.DataFrame:
    """Every micro-iteration's verdict over all jobs of the stage (kept or not)."""
    return counts_table(micro_iteration_verdict_counts(summary.get("counts", {})), "micro-iterations")


def ratios(out: Path) -> pd.DataFrame:
    """Words of the draft and of its extension per kept job, per language."""
    ext = pd.DataFrame(read_records(out / "extensions.jsonl", ExtensionRecord),
                       columns=["language", "draft_words", "words", "ratio", "tries", "micro_iterations_accepted"])
    return ext.groupby("language").agg(jobs=("words", "size"), draft_words=("draft_words", "mean"),
                                       words=("words", "mean"), ratio_min=("ratio", "min"),
                                       ratio_mean=("ratio", "mean"), tries=("tries", "mean")).round(2)


def tries(records: list[dict]) -> pd.DataFrame:
    """Every try of every kept job: the draft's words and the words of the try's best text (the draft's when no
    micro-iteration was accepted). The last try of a job is the one kept; each earlier one ended at or below
    the length rule and the job started again from the draft. Jobs that gave up write no record: they are
    counted in the stage's summary only."""
    rows = []
    for record in records:
        best: dict[int, int] = {}
        for r in record.get("micro_iterations", []):
            best.setdefault(r["try_index"], record["draft_words"])
            if r["verdict"] == "accepted":
                best[r["try_index"]] = max(best[r["try_index"]], r["words"])
        best.setdefault(record["tries"], record["words"])  # a record without micro-iterations: its kept try only
        for try_index, words in sorted(best.items()):
            kept = try_index == record["tries"]
            rows.append({"id": record["id"], "language": record["language"], "try": try_index,
                         "draft words": record["draft_words"], "extended words": record["words"] if kept else words,
                         "outcome": "kept" if kept else "below the rule: started again"})
    return pd.DataFrame(rows, columns=["id", "language", "try", "draft words", "extended words", "outcome"])


def rejected_micro_iterations(records: list[dict]) -> pd.DataFrame:
    """Every rejected micro-iteration of the kept jobs: the draft's words, the words of its new text, the
    verdict."""
    return pd.DataFrame([{"id": record["id"], "draft words": record["draft_words"], "words": r["words"],
                          "verdict": r["verdict"]} for record in records for r in record.get("micro_iterations", [])
                         if r["verdict"] != "accepted"], columns=["id", "draft words", "words", "verdict"])


def length_rule_figure(table: pd.DataFrame, min_ratio: float, rejected: pd.DataFrame | None = None) -> Figure:
    """Draft words against extended words, one point per try (tries()), coloured by outcome, with the length
    rule's line y = min_ratio x (a job is kept above it) and y = x (a try that accepted no micro-iteration); with
    `rejected` (rejected_micro_iterations()), each rejected micro-iteration's new text as a grey cross, its
    verdict beside it."""
    fig = Figure(figsize=(6.5, 4.6))
    ax = fig.subplots()
    rejected = rejected if rejected is not None and len(rejected) else None
    if rejected is not None:
        ax.scatter(rejected["draft words"], rejected["words"], marker="x", c="grey", alpha=0.8,
                   label="a micro-iteration's new text, rejected")
        for _, r in rejected.iterrows():
            ax.annotate(r["verdict"], (r["draft words"], r["words"]), fontsize=7, color="grey",
                        xytext=(4, -3), textcoords="offset points")
    colours = {"kept": "tab:green", "below the rule: started again": "tab:red"}
    markers = {"en": "o", "zh": "s"}
    for (outcome, language), part in table.groupby(["outcome", "language"]):
        ax.scatter(part["draft words"], part["extended words"], c=colours.get(outcome, "tab:grey"),
                   marker=markers.get(language, "^"), alpha=0.75, label=f"{outcome} ({language})")
    ys = list(table["extended words"]) + (list(rejected["words"]) if rejected is not None else [])
    high = max([1.0] + list(table["draft words"]) + [y / min_ratio for y in ys]) * 1.1
    ax.plot([0, high], [0, min_ratio * high], color="black", linewidth=1.2,
            label=f"y = {min_ratio:g} x: the length rule")
    ax.plot([0, high], [0, high], color="grey", linestyle="--", linewidth=1, label="y = x")
    ax.set(xlim=(0, high), ylim=(0, min_ratio * high * 1.05), xlabel="draft words", ylabel="extended words")
    ax.set_title(f"each try of each kept job: kept when extended > {min_ratio:g} x draft", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
