"""Figures of one run or of several side by side (seaborn), each saved as a file.

Every function takes a table from slkit.evaluation.reports; a table with a "run" column holding several runs
is drawn as one panel per run, with the same axes, so runs compare at a glance.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import seaborn as sns
from matplotlib.figure import Figure


def _draw(table, draw: Callable, title: str, path: str | Path, width: float = 6.5, log: bool = False) -> Path:
    # A Figure of its own, not pyplot's: no global backend or state, so a notebook's inline plots are untouched.
    runs = sorted(table["run"].unique()) if "run" in table.columns and len(table) else [None]
    fig = Figure(figsize=(width * len(runs), 4.2))
    axes = fig.subplots(1, len(runs), squeeze=False, sharex=log, sharey=True)
    for ax, run in zip(axes[0], runs):
        part = table if run is None else table[table["run"] == run]
        if len(part):
            draw(part, ax)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title if run is None else f"{run}: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_lengths(table, path: str | Path) -> Path:
    """Words per text by stage, one group per iteration (box plot with the points over it)."""
    def draw(t, ax):
        sns.boxplot(data=t, x="iteration", y="words", hue="stage", ax=ax, showfliers=False)
        sns.stripplot(data=t, x="iteration", y="words", hue="stage", dodge=True, ax=ax, size=3, color="black",
                      alpha=0.5, legend=False)
    return _draw(table, draw, "words per text by stage and iteration", path)


def plot_required_vs_produced(table, path: str | Path) -> Path:
    """Produced words against required words on log-log axes with the y = x line (LongWriter's plot)."""
    def draw(t, ax):
        t = t.assign(produced=t["words"].clip(lower=1), iteration=t["iteration"].astype(str))
        sns.scatterplot(data=t, x="required", y="produced", hue="iteration", style="type", ax=ax, alpha=0.8)
        low = min(t["required"].min(), t["produced"].min()) * 0.8
        high = max(t["required"].max(), t["produced"].max()) * 1.25
        ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="y = x")
        ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
               xlabel="required words", ylabel="produced words")
    return _draw(table, draw, "required vs produced length", path, log=True)


def _bars_by_type(table, value: str, ylabel: str, title: str, path: str | Path, ylim=None) -> Path:
    def draw(t, ax):
        sns.barplot(data=t, x="type", y=value, hue="iteration", ax=ax, errorbar=None)
        ax.set(ylim=ylim, ylabel=ylabel)
        ax.tick_params(axis="x", rotation=20)
    return _draw(table, draw, title, path)


def plot_length_scores(table, path: str | Path, scale: float = 1.0) -> Path:
    """Mean length score per constraint type, one bar per iteration."""
    return _bars_by_type(table, "score", f"length score (max {scale:g})", "length score per type and iteration",
                         path, ylim=(0, scale))


def plot_length_stability(table, path: str | Path) -> Path:
    """Coefficient of variation of produced words over each query's samples, per type and iteration."""
    return _bars_by_type(table, "cv", "coefficient of variation (lower = steadier)", "length stability over samples",
                         path)


def plot_filter_rates(table, path: str | Path) -> Path:
    """Share of candidates each filter accepted or rejected, per stage and iteration."""
    def draw(t, ax):
        t = t.assign(filter=t["stage"] + ": " + t["check"], iteration=t["iteration"].astype(str))
        sns.barplot(data=t, y="filter", x="rate", hue="iteration", ax=ax, orient="h", errorbar=None)
        ax.set(xlim=(0, 1), xlabel="share of candidates", ylabel="")
    return _draw(table, draw, "acceptance and rejection rates", path, width=8)


def plot_distinct(table, path: str | Path) -> Path:
    """Distinct-n (share of distinct n-grams) per stage over iterations: repetition drift."""
    def draw(t, ax):
        t = t.assign(series=t["stage"] + " " + t["language"], n=t["n"].map(lambda n: f"distinct-{n}"))
        sns.lineplot(data=t, x="iteration", y="distinct", hue="series", style="n", markers=True, ax=ax)
        ax.set(ylim=(0, 1.02), ylabel="distinct n-grams / all n-grams")
        ax.set_xticks(sorted(t["iteration"].unique()))
    return _draw(table, draw, "repetition drift (distinct-n)", path)


def plot_growth(table, path: str | Path) -> Path:
    """Median words per column (baseline, iter_<k>, length_control): the benchmark answers the model ended itself,
    and the loop's drafts and extensions, per language (slkit.evaluation.growth.GrowthReport.growth_table)."""
    def draw(t, ax):
        sns.lineplot(data=t, x="position", y="median", hue="language", style="series", markers=True, dashes=True,
                     ax=ax, hue_order=sorted(t["language"].unique()))
        ticks = t.drop_duplicates("position").sort_values("position")
        ax.set_xticks(ticks["position"], ticks["column"])
        ax.set(xlabel="", ylabel="median words", ylim=(0, None))
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the lines, not on them
    return _draw(table, draw, "growth: median words per iteration", path, width=9)
