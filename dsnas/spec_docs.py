"""The study-file reference, docs/study-file.md, generated from the dataclasses the loader builds (dsnas.spec):
their defaults, types and `#` comments. `python -m dsnas.spec_docs --write` regenerates it; a test fails when stale."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import io
import re
import sys
import tokenize
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any

from dsnas import spec

PAGE = Path(__file__).resolve().parent.parent / "docs" / "study-file.md"
COMMAND = "python -m dsnas.spec_docs --write"
# Dataclass fields that no study-file key sets: the loader fills them in itself.
NOT_KEYS = {"path": "the study file's own path", "task.base_dir": "the study file's folder"}
# What the loader reads itself rather than into a section dataclass; written by hand in HEADER below.
HAND_WRITTEN = {"study": ("name", "storage", "seed", "callbacks", "json_artifacts"),
                "objectives": tuple(spec.OBJECTIVES)}
# The built-in task's parameters ([task] keys), read from the source: importing that module would import torch.
TASK_PARAMS = {"charlm": ("dsnas.tasks.charlm", "CharLMConfig"),
               "images": ("dsnas.tasks.images", "ImagesConfig")}
UNSET = object()  # a field without a default
_WORDS = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "dict": "table"}


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    type: str  # in TOML's words: "integer", "list of integers", ...
    default: Any
    text: str  # the field's comment in the source
    choices: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Table:
    name: str  # the TOML table its keys go in: "hardware.constraints"
    title: str  # the page's heading: "[hardware.constraints]"
    intro: str  # the class docstring
    keys: tuple[Key, ...]


def tables() -> list[Table]:
    """Every study-file table built from a dataclass, in StudySpec's order, nested tables after their parent."""
    out: list[Table] = []
    hints = typing.get_type_hints(spec.StudySpec)
    for f in dataclasses.fields(spec.StudySpec):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _walk(f.name, hints[f.name])
        if f.name == "task":
            out += [_source_table(f'[task] for name = "{name}"', *where) for name, where in TASK_PARAMS.items()]
    return out


def _walk(name: str, cls: type) -> list[Table]:
    hints = typing.get_type_hints(cls)
    node = _class_node(cls.__module__, cls.__name__)
    comments, choices = _comments(cls.__module__, node), _choices(cls.__module__, node)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested += _walk(f"{name}.{f.name}", hint)
        elif f"{name}.{f.name}" not in NOT_KEYS and _word(hint) != "table":  # a dict field holds the other keys
            default = f.default if f.default is not dataclasses.MISSING else UNSET
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else default
            keys.append(Key(f.name, _word(hint), default, comments.get(f.name, ""), choices.get(f.name, ())))
    return [Table(name, f"[{name}]", ast.get_docstring(node) or "", tuple(keys)), *nested]


def _source_table(title: str, module_name: str, class_name: str) -> Table:
    """A task's parameters: a dataclass read from its source, without importing its module (defaults must be
    literals). They are keys of [task] itself."""
    node = _class_node(module_name, class_name)
    comments, choices = _comments(module_name, node), _choices(module_name, node)
    keys = tuple(Key(s.target.id, _source_word(ast.unparse(s.annotation)),
                     ast.literal_eval(s.value) if s.value else UNSET, comments.get(s.target.id, ""),
                     choices.get(s.target.id, ()))
                 for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name))
    return Table("task", title, ast.get_docstring(node) or "", keys)


@functools.cache
def _module_source(module_name: str) -> tuple[str, ast.Module]:
    found = importlib.util.find_spec(module_name)
    if found is None or found.origin is None:
        raise LookupError(f"{module_name} is not there: update TASK_PARAMS in {__name__}")
    text = Path(found.origin).read_text(encoding="utf-8")
    return text, ast.parse(text)


def _class_node(module_name: str, class_name: str) -> ast.ClassDef:
    _, tree = _module_source(module_name)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return node
    raise LookupError(f"no class {class_name} in {module_name}: update TASK_PARAMS in {__name__}")


def _comments(module_name: str, node: ast.ClassDef) -> dict[str, str]:
    """Each field's comment: the block of comment lines right above it, then the one at its end."""
    text, _ = _module_source(module_name)
    lines = text.splitlines()
    found = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(text).readline)
             if t.type == tokenize.COMMENT}
    out = {}
    for field in node.body:
        if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
            continue
        above, row = [], field.lineno - 1
        while row in found and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, found[row])
            row -= 1
        at_end = [found[r] for r in range(field.lineno, field.end_lineno + 1) if r in found]
        out[field.target.id] = " ".join(above + at_end)
    return out


def _choices(module_name: str, node: ast.ClassDef) -> dict[str, tuple[str, ...]]:
    """A key's allowed values, where the class checks them against literals: ``self.KEY in NAME`` with a
    module-level tuple NAME, or a dict literal {"KEY": ("a", "b")} in the class."""
    _, tree = _module_source(module_name)
    constants = {t.id: s.value for s in tree.body if isinstance(s, ast.Assign) for t in s.targets
                 if isinstance(t, ast.Name)}
    out: dict[str, tuple[str, ...]] = {}
    for sub in ast.walk(node):
        if (isinstance(sub, ast.Compare) and isinstance(sub.ops[0], ast.In) and isinstance(sub.left, ast.Attribute)
                and isinstance(sub.comparators[0], ast.Name) and sub.comparators[0].id in constants):
            out[sub.left.attr] = _strings(constants[sub.comparators[0].id])
        elif isinstance(sub, ast.Dict) and all(isinstance(k, ast.Constant) for k in sub.keys):
            out.update({k.value: _strings(v) for k, v in zip(sub.keys, sub.values, strict=True)})
    return {k: v for k, v in out.items() if v}


def _strings(node: ast.expr) -> tuple[str, ...]:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return ()
    ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return value if ok else ()


def _word(hint: Any) -> str:
    """A type in TOML's words: int | None -> "integer", tuple[int, ...] -> "list of integers"."""
    if isinstance(hint, types.UnionType):
        return " or ".join(_word(t) for t in typing.get_args(hint) if t is not type(None))
    if typing.get_origin(hint) is tuple:
        return f"list of {_word(typing.get_args(hint)[0])}s"
    if typing.get_origin(hint) is dict:
        return "table"
    return _WORDS.get(getattr(hint, "__name__", ""), str(hint))


def _source_word(annotation: str) -> str:
    """The same for an annotation read from source: "int | None", "tuple[int, ...]"."""
    words = []
    for part in (p.strip() for p in annotation.split("|")):
        inner = re.fullmatch(r"tuple\[(\w+), \.\.\.\]", part)
        words += [] if part == "None" else [f"list of {_WORDS[inner[1]]}s" if inner else _WORDS.get(part, part)]
    return " or ".join(words)


def _literal(value: Any) -> str:
    """A default as one writes it in TOML."""
    if value is UNSET or value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        return f"`{value:_}`" if value >= 10_000 else f"`{value}`"
    if isinstance(value, float):
        short = Fraction(value).limit_denominator(100)
        return f"{short} (`{value:.3g}`)" if len(repr(value)) > 8 and float(short) == value else f"`{value!r}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return f"`[{', '.join(str(v) for v in value)}]`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


HEADER = f"""<!-- Generated by `{COMMAND}` from the dataclasses the study file loads into (dsnas/spec.py,
and the built-in task's parameters): edit their defaults and `#` comments there, then regenerate.
tests/test_docs.py fails when this page is stale. -->
# The study file

A study is a TOML file; `dsnas search STUDY.toml` runs it, and `dsnas init DIR` writes one to start from
(`studies/quickstart.toml`). Every key is optional; relative paths are relative to the study file. A table or key
the loader does not know stops the study before any work, with one line that names it.

Each table below the first two is generated from the dataclass the loader builds it into, so its defaults are the
code's; "unset" means the key has no value unless you give one. `[study]`, `[objectives]` and the notes marked
*loader* are written by hand in `dsnas/spec_docs.py`: the loader fills those in itself.

## [study]

| key | type | default | meaning |
| --- | --- | --- | --- |
| `name` | string | the file's stem | study name (letters, digits, `_ - .`); it names the database and folders |
| `storage` | string | `sqlite:///NAME.db` beside the file | an SQLAlchemy URL: SQLite, PostgreSQL, MySQL |
| `seed` | integer | `0` | trial N trains with seed `seed + N` (kept if queued again); `[sampler] seed`: candidates |
| `callbacks` | list of strings | `[]` | `"module:callable"` of Optuna callbacks `(study, trial)` ([usage](usage.md)) |
| `json_artifacts` | boolean | `false` | each trial's arch and profile as JSON files as it ends (else the dashboard's) |

A search keeps a SQLite file in write-ahead-log mode (one synced file per commit): while one runs, copy
`NAME.db-wal` along with `NAME.db`. The last search or `dsnas dashboard` to end (Ctrl-C or SIGTERM) puts it back in
rollback-journal mode, one file that an account which may only read it can open.

## [objectives]

`NAME = "maximize"` or `"minimize"`, in order; without the table, accuracy and throughput, both maximized.
"""

NOTES = {  # by heading
    "[space]": "A search-space file's own format is in [search-space.md](search-space.md).",
    "[task]": "*loader*: every other `[task]` key is a parameter of the task `name` names; the built-in task's are "
            "the next table. A task of your own: [own-model.md](own-model.md).",
    '[task] for name = "charlm"': "The keys of the built-in task, `name = \"charlm\"` (they go in `[task]` itself).",
    '[task] for name = "images"': "The keys of the built-in image task, `name = \"images\"` (with the `cnn` family; "
                                  "`pip install \"dsnas[images]\"`).",
}


def render() -> str:
    rows = [f"| objective `{name}` | `{metric}` |" for name, (metric, _) in spec.OBJECTIVES.items()]
    rows += [f"| limit `{f.name}` ([hardware.constraints]) | `{f.name.removeprefix('max_')}` |"
             for f in dataclasses.fields(spec.Constraints)]
    out = [HEADER, "The metric key each objective and limit reads from a trial's metrics (a task's own `evaluate_arch` "
           "must return it; a trial without it fails and says which):", "", "| objective or limit | metric key |",
           "| --- | --- |", *rows]
    for table in tables():
        out += ["", f"## {table.title}", ""]
        for text in (" ".join(table.intro.split()), NOTES.get(table.title, "")):
            out += [text, ""] if text else []
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key in table.keys:
            kind = f"{key.type}: {', '.join(f'`{c}`' for c in key.choices)}" if key.choices else key.type
            out.append(f"| `{key.name}` | {kind} | {_literal(key.default)} | {_cell(key.text)} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsnas.spec_docs", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {PAGE} instead of printing it")
    args = parser.parse_args(argv)
    if args.write:
        if not PAGE.parent.is_dir():
            parser.error(f"--write needs a source checkout with {PAGE.parent}; print the page instead")
        PAGE.write_text(render(), encoding="utf-8")
        print(f"wrote {PAGE}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
