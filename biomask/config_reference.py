"""The reference of every stage's config keys (docs/config-reference.md), generated from the schemas.

The schemas are the truth: each key's type and default come from its pydantic field, its line from the
field's `description` or, where the schema says it in a comment (the house style), from the comment
on the field's line or the comment block right above it. `biomask config-reference` writes the file;
tests/test_config_reference.py fails when the committed file no longer matches the schemas.
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

from biomask.config import field_model
from biomask.stages import STAGES

DEFAULT_OUTPUT = Path("docs/config-reference.md")

HEADER = """\
# Config reference

Every key of every stage's config, generated from the config schemas by `biomask config-reference`
(do not edit by hand: tests/test_config_reference.py checks that this file matches the schemas).
Set a key in the YAML file given with `--config`, or on the command line as `key.sub=value` (values
are parsed as YAML: `train.steps=3000`, `masking.ratio={low: 0.1, high: 0.5}`, `seeds=[0,1,2]`).
Keys under a list (`inputs[].path`) belong to each item. `biomask <stage> --print-config` prints
the config a stage would run with. Annotated examples: `configs/`.
"""


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> its comments in the class source: the block right above, then the one on its line."""
    try:
        source = textwrap.dedent(inspect.getsource(model))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}  # line -> comment text
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    found: dict[str, str] = {}
    (cls,) = ast.parse(source).body
    for node in cls.body:  # type: ignore[attr-defined]
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comments and line not in code_lines:  # a comment block of its own
            above.insert(0, comments[line])
            line -= 1
        beside = [
            comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments
        ]
        found[node.target.id] = " ".join(above + beside)
    return found


def type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {' | '.join(type_name(a) for a in args if a is not Ellipsis)}"
    if origin is dict:
        return "mapping"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "—"
    value = to_jsonable_python(value)
    if value is PydanticUndefined:
        return "required"
    return "null" if value is None else f"`{json.dumps(value, ensure_ascii=False)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key of a schema, sections expanded in place."""
    comments = field_comments(model)
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = field_model(field.annotation)
        line = field.description or comments.get(name, "")
        if nested is not None:
            kind = type_name(field.annotation)
            kind, inner = (
                ("mapping of sections", f"{key}.<name>.")
                if kind.startswith("mapping")
                else ("list of sections", f"{key}[].")
                if kind.startswith("list")
                else ("section", f"{key}.")
            )
            own = nested.__dict__.get("__doc__") or ""  # not the docstring of the Config base
            doc = inspect.cleandoc(own).split("\n\n")[0].replace("\n", " ")
            out.append((key, kind, default_text(field), line or doc))
            out += rows(nested, inner)
        else:
            out.append((key, type_name(field.annotation) + bounds(field), default_text(field), line))
    return out


BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}


def bounds(field: Any) -> str:
    """The field's numeric limits, e.g. " (≥ 1)"."""
    found = [
        f"{sign} {getattr(item, name)}"
        for item in field.metadata
        for name, sign in BOUNDS.items()
        if getattr(item, name, None) is not None
    ]
    return f" ({', '.join(found)})" if found else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    parts = [HEADER]
    for stage in STAGES.values():
        schema = stage.config_class()
        if schema is None:
            continue
        parts.append(f"\n## `biomask {stage.name}`\n\nSchema: `{stage.schema}`.\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for key, kind, default, line in rows(schema):
            parts.append(f"| `{key}` | {_cell(kind)} | {_cell(default)} | {_cell(line)} |")
        parts.append("")
    return "\n".join(parts)


def write(path: Path = DEFAULT_OUTPUT) -> Path:
    from biomask.outputs import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render())
    return path
