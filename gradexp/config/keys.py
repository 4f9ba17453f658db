"""Every config key described from the schema itself (type, default, what is allowed): `gradexp keys`,
its --markdown table in the docs, and the short names a sweep gives the keys it varies."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gradexp.config.load import unknown_key
from gradexp.config.schema import Config, ConfigError


@dataclass
class KeyDoc:
    """One leaf key of the schema as `gradexp keys` and the docs show it."""
    key: str  # dotted path, e.g. 'model.depth'
    allowed: str  # e.g. 'integer in [1, 1000]', or the choices of a Literal
    default: str  # as YAML writes it: 20, null, true, sigmoid
    meaning: str  # the field's description


def _bounds(field: FieldInfo) -> str:
    """'>= 1', '> 0', 'in [1, 1000]', 'in [0, 1)' from the field's ge/gt/le/lt constraints."""
    low = next(((c.ge, "[") if isinstance(c, annotated_types.Ge) else (c.gt, "(") for c in field.metadata
                 if isinstance(c, (annotated_types.Ge, annotated_types.Gt))), None)
    high = next(((c.le, "]") if isinstance(c, annotated_types.Le) else (c.lt, ")") for c in field.metadata
                  if isinstance(c, (annotated_types.Le, annotated_types.Lt))), None)
    if low and high:
        return f" in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low:
        return f" {'>=' if low[1] == '[' else '>'} {low[0]:g}"
    if high:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return ""


_TYPE_WORDS = {bool: "true, false", int: "integer", float: "number", str: "text", dict: "mapping"}


def _allowed(field: FieldInfo) -> str:
    """What a field accepts, from its annotation and constraints (or the rule its validator enforces)."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "allowed" in extra:
        return str(extra["allowed"])
    t = field.annotation
    optional = get_origin(t) is types.UnionType and type(None) in get_args(t)  # `int | None`
    if optional:
        (t,) = [a for a in get_args(t) if a is not type(None)]
    if get_origin(t) is Literal:
        words = ", ".join(map(str, get_args(t)))
    else:
        words = _TYPE_WORDS[get_origin(t) or t] + (_bounds(field) if t in (int, float) else "")
    return words + (" or null" if optional else "")


def yaml_text(value: Any) -> str:
    """A value as it is written in a config file: 20, 0.001, true, null, {}, sigmoid."""
    return value if isinstance(value, str) else json.dumps(value)


def key_docs(prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema, in schema order: its allowed values, default and meaning; only the
    keys at or under `prefix` ('model', 'train.steps') when given. Raises ConfigError for a prefix that
    is no key or section."""
    docs: list[KeyDoc] = []

    def walk(model: type[BaseModel], path: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{path}{name}"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, key + ".")
                continue
            default = field.default_factory() if field.default_factory is not None else field.default
            docs.append(KeyDoc(key, _allowed(field), yaml_text(default), field.description or ""))

    walk(Config, "")
    if not prefix:
        return docs
    picked = [d for d in docs if d.key == prefix or d.key.startswith(prefix + ".")]
    if not picked:
        raise ConfigError(unknown_key(tuple(prefix.split("."))))
    return picked


def keys_markdown(docs: list[KeyDoc]) -> str:
    """The keys as a Markdown table (docs/configuration.md)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = [f"| `{d.key}` | {cell(d.allowed)} | `{d.default}` | {cell(d.meaning)} |" for d in docs]
    return "\n".join(["| key | allowed | default | meaning |", "|---|---|---|---|", *rows]) + "\n"


def keys_table(docs: list[KeyDoc]):
    """The keys as a rich table for the terminal."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("key", no_wrap=True, style="bold")
    table.add_column("allowed", max_width=24)
    table.add_column("default", no_wrap=True)
    table.add_column("meaning")
    for d in docs:
        table.add_row(d.key, d.allowed, d.default, d.meaning)
    return table


def value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def key_labels(keys: list[str]) -> dict[str, str]:
    """The name part for each varying grid key: its last component, or the whole key where two share one."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: leaf if leaves.count(leaf) == 1 else k for k, leaf in zip(keys, leaves)}
