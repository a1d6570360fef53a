"""The extensions lesson (notebooks/02_extensions.ipynb): one draft through the two-stage extension, round by round.

Every round of a kept job is in its extensions.jsonl record (`rounds`, slkit.method.extensions.round_trace):
the stage-1 output, how many of its paragraphs were kept, the continuation, the words and the verdict. The
rest is rebuilt here the way extend_drafts built it: each attempt starts from the draft, an accepted round's
text is the next round's input, the stage-1 prompt is the template over the input's former half, stage 2's
the template over the whole input, pre-filled with the kept head.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from IPython.display import Markdown
from matplotlib.figure import Figure

from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.lessons import counts_table, steps
from slkit.method.extensions import first_paragraphs, former_part, stage2_prefill, stage2_text
from slkit.method.prompts import extension_prompt
from slkit.method.textstats import count_words


def replay(record: dict) -> list[dict]:
    """Each round of an extension record with the texts it worked on: its input, the stage-1 prompt, the
    kept head, the pre-fill, the stage-2 prompt and the new text, next to what the record holds."""
    query, language = record["query"], record["language"]
    shown, current, attempt = [], record["draft"], None
    best = record["draft_words"]
    for r in record["rounds"]:
        if r["attempt"] != attempt:  # each attempt starts again from the draft
            attempt, current, best = r["attempt"], record["draft"], record["draft_words"]
        kept = first_paragraphs(r["stage1"], r["kept_paragraphs"])
        new_text = stage2_text(kept, r["continuation"])
        shown.append({**r, "input": current, "input_words": count_words(current), "best_before": best,
                      "stage1_prompt": extension_prompt(query, former_part(current), language),
                      "stage1_paragraphs": len(r["stage1"].split("\n\n")), "kept": kept,
                      "prefill": stage2_prefill(kept),
                      "stage2_prompt": extension_prompt(query, current, language), "new_text": new_text})
        if r["verdict"] == "accepted":
            current, best = new_text, r["words"]
    return shown


def rounds_table(record: dict) -> pd.DataFrame:
    """One row per round of an extension record: words in, paragraphs kept, words of the continuation and of
    the new text, the best so far and the verdict."""
    rows = [{"attempt": r["attempt"], "round": r["round"], "input words": r["input_words"],
             "stage-1 words": count_words(r["stage1"]),
             "kept paragraphs": f"{r['kept_paragraphs']} of {r['stage1_paragraphs']}",
             "continuation words": count_words(r["continuation"]), "new words": r["words"],
             "best before": r["best_before"], "verdict": r["verdict"]} for r in replay(record)]
    return pd.DataFrame(rows).set_index(["attempt", "round"])


def kept_extensions(out: Path) -> list[dict]:
    """The records of extensions.jsonl (the kept jobs)."""
    return read_jsonl(out / "extensions.jsonl")


def pick(records: list[dict]) -> dict | None:
    """The extension the lesson follows: the one with the most rounds (the most to show), first by id."""
    return min(records, key=lambda r: (-len(r.get("rounds", [])), r["id"])) if records else None


def walkthrough(record: dict, params: Params, max_rounds: int = 4) -> Markdown:
    """The first `max_rounds` rounds of one extension, text by text, then the length rule on its best text."""
    if not record.get("rounds"):
        return Markdown(f"Record `{record['id']}` predates the recorded rounds: rerun the stage to see them.")
    items: list[tuple[str, str | None]] = [
        (f"Record `{record['id']}` of extensions.jsonl: job {record['sample']} of draft `{record['draft_id']}` "
         f"({record['language']}, {record['draft_words']} words), kept at attempt {record['attempts']}", None),
        ("The request", record["query"])]
    rounds = replay(record)
    for r in rounds[:max_rounds]:
        head = f"Attempt {r['attempt']}, round {r['round']}"
        items += [
            (f"{head}. Its input text", r["input"]),
            (f"{head}. 1. The stage-1 prompt (the template over the input's former half)", r["stage1_prompt"]),
            (f"{head}. 2. What the Extender wrote in stage 1", r["stage1"]),
            (f"{head}. 3. The kept head: {r['kept_paragraphs']} of its {r['stage1_paragraphs']} paragraphs", r["kept"]),
            (f"{head}. 4. Stage 2: the template over the whole input, and the pre-fill the answer starts with",
             r["stage2_prompt"] + "\n\n[answer pre-filled with:]\n\n" + r["prefill"]),
            (f"{head}. 5. The continuation the Extender wrote after the pre-fill", r["continuation"]),
            (f"{head}. 6. New text = kept head + continuation: {r['words']} words against {r['best_before']} "
             f"before; verdict: {r['verdict']}", None),
        ]
    if len(rounds) > max_rounds:
        items.append((f"... {len(rounds) - max_rounds} more round(s): see the table below", None))
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
        f"attempt, {c.get('retried', 0)} restarts from the draft along the way. Failed jobs write no record; "
        f"why their rounds failed is in the round verdicts below (all jobs, kept or not).")


def round_verdicts(summary: dict) -> pd.DataFrame:
    """Every round's verdict over all jobs of the stage (kept or not)."""
    rounds = {k.removeprefix("round_"): n for k, n in summary.get("counts", {}).items() if k.startswith("round_")}
    return counts_table(rounds, "rounds")


def ratios(out: Path) -> pd.DataFrame:
    """Words of the draft and of its extension per kept job, per language."""
    ext = pd.DataFrame(read_jsonl(out / "extensions.jsonl"),
                       columns=["language", "draft_words", "words", "ratio", "attempts", "rounds_accepted"])
    return ext.groupby("language").agg(jobs=("words", "size"), draft_words=("draft_words", "mean"),
                                       words=("words", "mean"), ratio_min=("ratio", "min"),
                                       ratio_mean=("ratio", "mean"), attempts=("attempts", "mean")).round(2)


def attempts(records: list[dict]) -> pd.DataFrame:
    """Every attempt of every kept job: the draft's words and the words of the attempt's best text (the draft's
    when no round was accepted). The last attempt of a job is the one kept; each earlier one ended at or below
    the length rule and the job started again from the draft. Jobs that gave up write no record: they are
    counted in the stage's summary only."""
    rows = []
    for record in records:
        best: dict[int, int] = {}
        for r in record.get("rounds", []):
            best.setdefault(r["attempt"], record["draft_words"])
            if r["verdict"] == "accepted":
                best[r["attempt"]] = max(best[r["attempt"]], r["words"])
        best.setdefault(record["attempts"], record["words"])  # a record without rounds: its kept attempt only
        for attempt, words in sorted(best.items()):
            kept = attempt == record["attempts"]
            rows.append({"id": record["id"], "language": record["language"], "attempt": attempt,
                         "draft words": record["draft_words"], "extended words": record["words"] if kept else words,
                         "outcome": "kept" if kept else "below the rule: started again"})
    return pd.DataFrame(rows, columns=["id", "language", "attempt", "draft words", "extended words", "outcome"])


def rejected_rounds(records: list[dict]) -> pd.DataFrame:
    """Every rejected round of the kept jobs: the draft's words, the words of the round's new text, the verdict."""
    return pd.DataFrame([{"id": record["id"], "draft words": record["draft_words"], "words": r["words"],
                          "verdict": r["verdict"]} for record in records for r in record.get("rounds", [])
                         if r["verdict"] != "accepted"], columns=["id", "draft words", "words", "verdict"])


def length_rule_figure(table: pd.DataFrame, min_ratio: float, rejected: pd.DataFrame | None = None) -> Figure:
    """Draft words against extended words, one point per attempt (attempts()), coloured by outcome, with the
    length rule's line y = min_ratio x (a job is kept above it) and y = x (an attempt that accepted no round);
    with `rejected` (rejected_rounds()), each rejected round's new text as a grey cross, its verdict beside it."""
    fig = Figure(figsize=(6.5, 4.6))
    ax = fig.subplots()
    rejected = rejected if rejected is not None and len(rejected) else None
    if rejected is not None:
        ax.scatter(rejected["draft words"], rejected["words"], marker="x", c="grey", alpha=0.8,
                   label="a round's new text, rejected")
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
    ax.set_title(f"each attempt of each kept job: kept when extended > {min_ratio:g} x draft", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
