"""Params as data: every setting with its value, default, the method's value, unit and description.

    slkit check params/demo.yaml --explain              # a recipe's values; those that differ are marked
    python -m slkit.running.explain > docs/params.md    # every setting, from the schema (a test keeps it in step)

The descriptions, units and reference values live next to each field in slkit/core/params.py (`setting`).
"""
from __future__ import annotations

import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from slkit.core.params import NO_REFERENCE, Params

REQUIRED: Any = object()  # the default of a setting every recipe must give (run_name, model.path)
_NO_VALUE: Any = object()  # rows of the schema alone (docs), which have no recipe's value
_CELL = 24  # characters of a value shown in a table column; longer ones are cut there and shown in full below


@dataclass(frozen=True)
class Setting:
    key: str  # dotted, as --set takes it: training.lora_r
    description: str
    unit: str | None  # None: the field was declared without `setting` (tests/test_params.py fails on it)
    default: Any  # REQUIRED when a recipe must set it
    reference: Any  # NO_REFERENCE when the method has no such setting
    section: type[BaseModel] | None  # the section a field holds (judge.model: ModelParams | None holds one too)
    optional: bool  # None is a value of the field


@dataclass(frozen=True)
class Group:
    key: str  # "" for the top level
    description: str
    rows: list[tuple[Setting, Any]]  # (setting, the recipe's value or _NO_VALUE)


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section (a pydantic model) an annotation holds, alone or in a union with None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if section_type(a)), None)
    return None


def settings(model: type[BaseModel], prefix: str = "") -> list[Setting]:
    """The fields of one section, in declaration order."""
    out = []
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        out.append(Setting(prefix + name, field.description or "", extra.get("unit"), default,
                           extra.get("reference", NO_REFERENCE), section_type(field.annotation),
                           type(None) in typing.get_args(field.annotation)))
    return out


def all_settings(model: type[BaseModel] = Params, prefix: str = "") -> list[Setting]:
    """Every field, sections included, recursively; a section that may be None (judge.model) too."""
    out = []
    for s in settings(model, prefix):
        out.append(s)
        if s.section:
            out += all_settings(s.section, s.key + ".")
    return out


def groups(model: type[BaseModel] = Params, params: BaseModel | None = None, key: str = "",
           description: str = "") -> list[Group]:
    """A section's rows, then its subsections' groups. With `params`, each row carries its value and a section
    set in the recipe (judge.model) is a group; without, sections that may be None are one row."""
    rows, subgroups = [], []
    for s in settings(model, key + "." if key else ""):
        value = getattr(params, s.key.rsplit(".", 1)[-1]) if params is not None else _NO_VALUE
        if isinstance(value, BaseModel):
            subgroups += groups(type(value), value, s.key, s.description)
        elif params is None and s.section and not s.optional:
            subgroups += groups(s.section, None, s.key, s.description)
        else:
            rows.append((s, value))
    return [Group(key, description or (model.__doc__ or ""), rows)] + subgroups


def shown(value: Any) -> str:
    """A value as JSON: strings quoted and escaped ("\\n\\n---"), null, true."""
    if value is REQUIRED:
        return "required"
    if value is NO_REFERENCE:
        return "none"
    return json.dumps(value, ensure_ascii=False)


def marks(s: Setting, value: Any) -> str:
    """'*' when a recipe's value is not the default, '!' when it is not the method's."""
    return (("*" if s.default is not REQUIRED and value != s.default else " ")
            + ("!" if s.reference is not NO_REFERENCE and value != s.reference else " "))


def explain(params: Params) -> str:
    """A table per section: each value with its default, reference value and unit, its description below."""
    lines = ["Marks: * not the default, ! not the method's value. reference: the value that reproduces the reference",
             "implementation; none: the method has no such setting (slkit's own, or speed and memory only).", ""]
    header = ("", "key", "value", "default", "reference", "unit")
    for group in groups(Params, params):
        if not group.rows:
            continue
        title = f"{group.key or 'top level'}: {group.description}"
        lines += textwrap.wrap(title, 110, subsequent_indent="    ") + [""]
        table = [header] + [(marks(s, v), s.key, shown(v), shown(s.default), shown(s.reference), s.unit or "?")
                            for s, v in group.rows]
        cut = [[cell if i not in (2, 3, 4) or len(cell) <= _CELL else cell[:_CELL - 1] + "…" for i, cell in enumerate(row)]
               for row in table]
        widths = [max(len(row[i]) for row in cut) for i in range(len(header))]
        for i, row in enumerate(cut):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                continue
            lines += textwrap.wrap(group.rows[i - 1][0].description, 110, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8)
            # A cell cut short is shown in full: the value, and a default or reference that is not the value.
            full = dict(zip(header[2:5], table[i][2:5]))
            lines += [f"{' ' * 8}{name}: {full[name]}" for name, cell in zip(header[2:5], row[2:5])
                      if cell != full[name] and (name == "value" or full[name] != full["value"])]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    """Text for a markdown table cell: | ends a cell, <run> is an HTML tag and r**3 starts bold text."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _code(value: Any) -> str:
    """A value in a markdown cell: JSON in backticks; `required` and `none` as words."""
    text = shown(value)
    return text if value is REQUIRED or value is NO_REFERENCE else "`" + text.replace("|", "\\|") + "`"


def markdown() -> str:
    """docs/params.md: every setting of the schema, a table per section."""
    lines = ["# Params", "",
             "Every setting of a recipe (`params/*.yaml`), from the schema in `slkit/core/params.py`; this file is",
             "written by `python -m slkit.running.explain > docs/params.md` and a test keeps it in step.",
             "`slkit check RECIPE --explain` prints the same for a recipe, with its values. *reference* is the value",
             "that reproduces the reference implementation (the numbers of the paper's code); none: the method has no",
             "such setting (slkit's own, or speed and memory only).", ""]
    for group in groups():
        if not group.rows:
            continue
        lines += [f"## {group.key or 'top level'}", "", _cell(group.description), "",
                  "| key | default | reference | unit | description |", "|---|---|---|---|---|"]
        lines += [f"| `{s.key}` | {_code(s.default)} | {_code(s.reference)} | {s.unit} | {_cell(s.description)} |"
                  for s, _ in group.rows]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
