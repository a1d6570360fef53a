"""Figures of a run (seaborn), saved as files next to the metrics they show."""
from __future__ import annotations

from pathlib import Path


def plot_lengths(table, path: str | Path):
    """Words per text by stage, one group per iteration (box plot with the points over it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(table):
        sns.boxplot(data=table, x="iteration", y="words", hue="stage", ax=ax, showfliers=False)
        sns.stripplot(data=table, x="iteration", y="words", hue="stage", dodge=True, ax=ax, size=3,
                      color="black", alpha=0.5, legend=False)
    ax.set_title("Words per text by stage and macro-iteration")
    ax.set_ylabel("words")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
