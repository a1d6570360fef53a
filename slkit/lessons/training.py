"""The training lesson (notebooks/03_training.ipynb): one resampled extension becomes a Generator example and an
Extender example with dropped lines; its tokens, and which of them carry the loss."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from slkit.core.layout import ROLES
from slkit.core.params import Params
from slkit.core.records import read_jsonl
from slkit.lessons import steps
from slkit.method.prompts import extension_prompt
from slkit.models.loading import load_tokenizer
from slkit.training.batches import tokenize_example
from slkit.training.long_context import IGNORE


def dropped_lines(draft: str, prompt: str, query: str, language: str) -> list[str]:
    """The draft's lines missing from the Extender prompt's text (drop_lines keeps the rest in order)."""
    head = extension_prompt(query, "", language)
    kept = prompt[len(head):].split("\n") if prompt.startswith(head) else prompt.split("\n")
    dropped, i = [], 0
    for line in draft.split("\n"):
        if i < len(kept) and kept[i] == line:
            i += 1
        else:
            dropped.append(line)
    return dropped


def token_table(params: Params, prompt: str, completion: str, around: int = 6) -> tuple[pd.DataFrame, dict]:
    """The tokens of one training example where the prompt ends and the answer begins, and whether each
    carries the loss; with the counts of each."""
    tokenizer = load_tokenizer(params.model)
    example = tokenize_example(tokenizer, prompt, completion, params.training.max_length, params.model.prompt_format)
    ids, labels = example["input_ids"], example["labels"]
    start = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    window = range(max(0, start - around), min(len(ids), start + around))
    table = pd.DataFrame([{"position": i, "token": tokenizer.decode([ids[i]]), "carries loss": labels[i] != IGNORE}
                          for i in window]).set_index("position")
    counts = {"tokens": len(ids), "prompt tokens (no loss)": start, "answer tokens (loss)": len(ids) - start,
              "cut at training.max_length": len(ids) >= params.training.max_length}
    return table, counts


def walkthrough(out: Path, params: Params) -> None:
    """One resampled extension of this run into both training sets, then its Extender example's tokens."""
    kept = sorted(read_jsonl(out / "resampled_extensions.jsonl"), key=lambda r: r["id"])
    if not kept:
        display(Markdown("No extension survived the resampling in this run: no example to show."))
        return
    record = kept[0]
    generator = {e["id"]: e for e in read_jsonl(out / "generator_sft.jsonl")}[record["id"]]
    extender = {e["id"]: e for e in read_jsonl(out / "extender_sft.jsonl")}[record["id"]]
    dropped = dropped_lines(record["draft"], extender["prompt"], record["query"], record["language"])
    display(steps([
        (f"Record `{record['id']}` of resampled_extensions.jsonl ({record['language']}, draft {record['draft_words']} "
         f"words, extended {record['words']})", None),
        ("1. Generator example, prompt (the request)", generator["prompt"]),
        ("2. Generator example, completion (the extended text)", generator["completion"]),
        ("3. Extender example, prompt (the template over the request and the draft with lines dropped)",
         extender["prompt"]),
        (f"4. The draft's lines dropped from it: {len(dropped)} of {len(record['draft'].split(chr(10)))}"
         + ("" if dropped else " (every line drew a keep)"), "\n".join(dropped) if dropped else None),
        ("5. Extender example, completion: the same extended text; where its prompt ends and its answer begins:",
         None),
    ]))
    table, counts = token_table(params, extender["prompt"], extender["completion"])
    display(table)
    display(pd.Series(counts, name="Extender example").to_frame())


def training_table(summary: dict) -> pd.DataFrame:
    """Per adapter: samples, whether it trained (and why not), steps, first and last loss, where it started."""
    rows = {role: {"samples": s.get("samples"), "trained": s.get("trained"), "steps": s.get("steps"),
                   "first loss": s.get("first_loss"), "last loss": s.get("final_loss"),
                   "started from": s.get("init_adapter") or "a new adapter", "note": s.get("reason", "")}
            for role, s in ((role, summary.get(role, {})) for role in ROLES)}
    return pd.DataFrame(rows).T


def losses(summary: dict) -> pd.DataFrame:
    """The loss of every training step, per adapter (for a line plot)."""
    return pd.DataFrame([{"adapter": role, "step": i + 1, "loss": loss} for role in ROLES
                         for i, loss in enumerate(summary.get(role, {}).get("losses", []))],
                        columns=["adapter", "step", "loss"])


def loss_figure(losses: pd.DataFrame) -> Figure:
    """The loss of every training step per adapter (losses()), on a Figure of its own."""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    sns.lineplot(data=losses, x="step", y="loss", hue="adapter", marker="o", ax=ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    ax.set_title("training loss per step (answer tokens only)", fontsize=10)
    fig.tight_layout()
    return fig
