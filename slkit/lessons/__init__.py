"""Lessons: what the stage notebooks show, computed here so the notebooks stay a few calls each.

    from slkit.lessons import setup, params_table
    params, out = setup(run_dir, iteration, "extensions")

Each notebook is a chapter on one step of the method, on its run's own data: the idea (the rule as a formula
in symbols, each symbol's value in this run, and the slkit code that applies it), this run's params, the whole
stage, one real item step by step, what to look for, and what to try (each with the command that tries it).
One module per stage (slkit.lessons.<stage>) holds the functions its notebook calls; this module holds what
they share: the setup, the params and symbols tables, source shown from slkit itself, the "try this"
commands, the quality check shown check by check, and text shown as a sequence of labelled steps.
"""
from __future__ import annotations

import inspect
import io
import json
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from IPython.display import Image, Markdown
from matplotlib.figure import Figure
from pydantic import BaseModel

from slkit.core.layout import load_run_params, stage_dir
from slkit.core.params import Params, QualityParams, load_params, parse_overrides
from slkit.core.registry import BY_NAME
from slkit.method.quality import ends_cleanly, meta_talk_words, quality_failure
from slkit.method.textstats import count_words, first_repeated_ngram, ngram_units

# The headings of every lesson notebook, in order (tests/test_lessons.py checks each notebook has them).
SECTIONS = ("The idea", "This run's params", "The whole stage", "One item, step by step", "What to look for",
            "Try this")


def setup(run_dir: str | Path, iteration: int, stage: str) -> tuple[Params, Path]:
    """The run's params (read here, once: the notebook passes them to its stage) and the directory `stage` writes
    in; pandas shows whole cells of text."""
    pd.set_option("display.max_colwidth", 160)
    pd.set_option("display.max_rows", 60)
    return load_run_params(run_dir), stage_dir(run_dir, iteration, stage)


def _flatten(section: BaseModel, reference: BaseModel, prefix: str) -> list[dict[str, Any]]:
    rows = []
    for name, field in type(section).model_fields.items():
        value, default = getattr(section, name), getattr(reference, name)
        if isinstance(value, BaseModel) and isinstance(default, BaseModel):
            rows += _flatten(value, default, f"{prefix}.{name}")
        else:
            rows.append({"param": f"{prefix}.{name}", "this run": _show(value), "reference": _show(default),
                         "changed": value != default, "what it is": field.description or ""})
    return rows


def params_table(params: Params, stage: str) -> pd.DataFrame:
    """Every param of the stage's params sections (slkit.core.registry): this run's value, the default
    (the reference's value, where the method has one), whether this run changed it, and its description."""
    rows = [row for name in BY_NAME[stage].params
            for row in _flatten(getattr(params, name), type(getattr(params, name))(), name)]
    table = pd.DataFrame(rows, columns=["param", "this run", "reference", "changed", "what it is"])
    if not table["what it is"].any():  # descriptions are added to params.py field by field
        table = table.drop(columns="what it is")
    return table.set_index("param")


def _show(value: Any) -> str:
    """A param value as text: one column of mixed types (lists, dicts, floats) shows every row alike."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quality_table(text: str, language: str, rules: QualityParams) -> pd.DataFrame:
    """The quality check of slkit.method.quality, check by check, on one text: what each looked at and whether
    it passed. The last row is the verdict quality_failure gives."""
    words = count_words(text)
    n = rules.ngram_zh if language == "zh" else rules.ngram_en
    repeated = first_repeated_ngram(ngram_units(text, language), n) if rules.check_repetition else None
    meta = sorted(meta_talk_words(text, language, rules))
    stripped = text.rstrip()
    rows = [
        ("not empty", "", bool(text.strip())),
        ("long enough", f"{words} words, quality.min_words {rules.min_words}", words >= rules.min_words),
        ("ends cleanly", f"last character {stripped[-1:]!r}" + ("" if rules.check_ending else " (check off)"),
         ends_cleanly(text, language, rules) or not rules.check_ending),
        (f"no repeated {n}-gram", ("first repeated: " + " ".join(repeated)) if repeated else
         ("none" if rules.check_repetition else "check off"), repeated is None),
        ("no meta-talk at the edges", ", ".join(meta) or "none" if rules.check_meta_talk else "check off",
         not (meta and rules.check_meta_talk)),
    ]
    failure = quality_failure(text, language, rules)
    rows.append(("verdict", failure or "passes", failure is None))
    return pd.DataFrame(rows, columns=["check", "what it saw", "passed"]).set_index("check")


def _fence(text: str, language: str = "text") -> str:
    """`text` in a fenced block that no run of backticks inside it can close."""
    ticks = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", text)])
    return f"{ticks}{language}\n{text}\n{ticks}"


def steps(items: Iterable[tuple[str, str | None]]) -> Markdown:
    """Labelled steps as markdown: a title, then its text in a block (a step whose text is None is a line of
    prose only)."""
    parts = []
    for title, text in items:
        parts.append(f"**{title}**" if text is None else f"**{title}** ({count_words(text)} words)\n\n{_fence(text)}")
    return Markdown("\n\n".join(parts))


def counts_table(counts: dict[str, int], name: str = "count") -> pd.DataFrame:
    """A {reason: count} mapping of a stage summary as a one-column table, largest first."""
    return pd.Series(counts, name=name, dtype=int).sort_values(ascending=False).to_frame()


def param_value(params: Params, dotted: str) -> Any:
    """The value of a dotted param name (`extensions.min_ratio`) in `params`."""
    value: Any = params
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def symbols(params: Params, names: dict[str, str | Callable[[Params], Any]]) -> pd.DataFrame:
    """The symbols of a lesson's formulas and their values in this run: {symbol: dotted param name}, or
    {symbol: (description, function of the params)} for a value made of params (a default that falls back on
    another param). Each row: the param, this run's value and the default (the reference's where it has one)."""
    reference = type(params).model_validate({"run_name": params.run_name, "model": params.model.model_dump()})
    rows = []
    for symbol, source in names.items():
        if isinstance(source, tuple):
            what, value = source
            rows.append({"symbol": symbol, "param": what, "this run": _show(value(params)),
                         "reference": _show(value(reference))})
        else:
            rows.append({"symbol": symbol, "param": source, "this run": _show(param_value(params, source)),
                         "reference": _show(param_value(reference, source))})
    return pd.DataFrame(rows).set_index("symbol")


def _repo_path(path: Path) -> str:
    """A source file's path from the root its top-level package sits in (slkit/method/extensions.py,
    peft/tuners/lora/layer.py): the same on every machine."""
    for root in sorted((Path(p).resolve() for p in sys.path if p), key=lambda p: -len(p.parts)):
        if path.is_relative_to(root):
            return path.relative_to(root).as_posix()
    return path.name


def show_source(*objects: Any, start: str | None = None, end: str | None = None) -> Markdown:
    """The source of functions, classes or methods as this kernel imported them (read with inspect, never
    copied), each under its file and line numbers, as markdown code blocks. With `start` (and `end`), one
    object is shown from its first line that contains `start` to the next line that contains `end` (or to
    its last line): the few lines of a long function that hold a rule."""
    if (start or end) and len(objects) != 1:
        raise ValueError("show_source: start and end cut one object's source")
    parts = []
    for obj in objects:
        lines, first = inspect.getsourcelines(obj)
        name = f"{obj.__module__}.{obj.__qualname__}"
        begin, stop = 0, len(lines)
        if start is not None:
            begin = next((i for i, line in enumerate(lines) if start in line), None)
            if begin is None:
                raise ValueError(f"show_source: no line of {name} contains {start!r}")
        if end is not None:
            last = next((i for i in range(begin, len(lines)) if end in lines[i]), None)
            if last is None:
                raise ValueError(f"show_source: no line of {name} after {start!r} contains {end!r}")
            stop = last + 1
        code = textwrap.dedent("".join(lines[begin:stop])).rstrip("\n")
        where = _repo_path(Path(inspect.getsourcefile(obj)).resolve())
        span = f"lines {first + begin}-{first + stop - 1}"
        part = f"`{name}`" + (f", from its line with `{start.strip()}`" if start else "")
        parts.append(f"{part} ({where}, {span}):\n\n{_fence(code, 'python')}")
    return Markdown("\n\n".join(parts))


def _yaml_value(value: Any) -> str:
    """A value as `--set KEY=VALUE` takes it (YAML): a scalar as YAML writes it, a list or mapping as JSON, which
    YAML reads too and which quotes every string the same way ({"path": "builtin:x"})."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return yaml.safe_dump(value, width=10**6, allow_unicode=True).strip().removesuffix("...").strip()


def try_this(run_dir: str | Path, name: str, changes: dict[str, Any]) -> Markdown:
    """The command that tries a change: a new run from this run's params (its params.yaml) under the run name
    `<run_name>-<name>` (a run refuses to resume with changed params), with each of `changes` set. The command
    is checked before it is shown, as `slkit check` would read it: its --set values parse, the params they make
    are valid, and they change this run's params (a key may restate this run's value, to be explicit)."""
    snapshot = Path(run_dir) / "params.yaml"
    current = load_params(snapshot)
    run_name = f"{current.run_name}-{name}"
    try:
        shown = snapshot.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = snapshot
    pairs = [f"run_name={run_name}"] + [f"{key}={_yaml_value(value)}" for key, value in changes.items()]
    command = shlex.join(["slkit", "run", str(shown)] + [arg for pair in pairs for arg in ("--set", pair)])
    # Read the command back as the shell and slkit's --set would.
    argv = shlex.split(command)
    overrides = parse_overrides([argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"])
    tried = load_params(snapshot, overrides)
    if all(param_value(tried, key) == param_value(current, key) for key in changes):
        raise ValueError(f"try_this: {', '.join(changes)}: these are this run's values already, nothing to try")
    return Markdown(f"```bash\n{command}\n```")


def figure_image(fig: Figure) -> Image:
    """A matplotlib Figure (drawn on its own, no pyplot state) as a PNG the notebook keeps in its output."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return Image(data=buffer.getvalue(), format="png")
