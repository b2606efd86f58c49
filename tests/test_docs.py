"""The docs: the generated study-file reference is current and every key it lists loads; the README stays short and
every relative link in it and in docs/ points at a file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from dsnas import spec, spec_docs
from dsnas.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README_MAX_LINES = 120
SPACE = str(REPO / "search_spaces" / "transformer_lm.toml")


def test_study_file_reference_is_current():
    page = DOCS / "study-file.md"
    assert page.read_text() == spec_docs.render(), f"docs/study-file.md is stale: run `{spec_docs.COMMAND}`"


def test_every_study_file_table_is_documented():
    documented = {t.name.partition(".")[0] for t in spec_docs.tables()} | set(spec_docs.HAND_WRITTEN)
    assert documented == set(spec._SECTIONS)
    hints = typing.get_type_hints(spec.StudySpec)
    loose = {f.name for f in dataclasses.fields(spec.StudySpec) if not dataclasses.is_dataclass(hints[f.name])}
    assert loose <= set(spec_docs.NOT_KEYS) | set(spec_docs.HAND_WRITTEN["study"]) | {"objectives"}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _write(folder: Path, raw: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    tables = [(k, v) for k, v in raw.items() if isinstance(v, dict)]
    while tables:
        name, table = tables.pop(0)
        lines += [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in table.items() if not isinstance(v, dict))]
        tables += [(f"{name}.{k}", v) for k, v in table.items() if isinstance(v, dict)]
    path = folder / "docs_check.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _study(**tables: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {"budget": {"n_trials": 2}, "space": {"file": SPACE}}
    for name, keys in tables.items():
        table = raw
        for part in name.split("."):
            table = table.setdefault(part, {})
        table.update(keys)
    return raw


def _keys() -> list[tuple[str, spec_docs.Key]]:
    return [(_task_name(t), k) for t in spec_docs.tables() for k in t.keys]


def _task_name(table: spec_docs.Table) -> str:
    """"task" for the default task's keys; "task:NAME" for another built-in task's ([task] name = NAME)."""
    found = re.search(r'name = "(\w+)"', table.title) if table.name == "task" else None
    return f"task:{found.group(1)}" if found and found.group(1) != "charlm" else table.name


@pytest.mark.parametrize("table,key", _keys(), ids=lambda v: getattr(v, "name", v))
def test_each_documented_key_is_one_the_loader_takes(tmp_path, table, key):
    """A key with a default loads set to it; one without is refused for its type, not as unknown."""
    table, _, task = table.partition(":")
    extra = {"name": task} if task else {}
    space = {"space": {"file": str(REPO / "search_spaces" / "cnn.toml")}} if task == "images" else {}  # its family
    if key.default is not None and key.default is not spec_docs.UNSET:
        value = list(key.default) if isinstance(key.default, tuple) else key.default
        spec.load_study(_write(tmp_path, _study(**space, **{table: {**extra, key.name: value}})))
        return
    with pytest.raises(SpecError) as caught:
        spec.load_study(_write(tmp_path, _study(**space, **{table: {**extra, key.name: [True]}})))
    assert caught.value.key.startswith(f"{table}.{key.name}") and "not a known key" not in caught.value.rule


def test_hand_written_keys_load(tmp_path):
    study = {"name": "docs_check", "seed": 0, "storage": f"sqlite:///{tmp_path / 'docs.db'}", "callbacks": [],
             "json_artifacts": True}
    assert set(study) == set(spec_docs.HAND_WRITTEN["study"])
    spec.load_study(_write(tmp_path, _study(study=study)))
    objectives = {name: "minimize" for name in spec_docs.HAND_WRITTEN["objectives"]}
    loaded = spec.load_study(_write(tmp_path, _study(objectives=objectives)))
    assert [o.name for o in loaded.objectives] == list(objectives)


@pytest.mark.parametrize("name", sorted(spec_docs.NOT_KEYS))
def test_fields_left_out_of_the_reference_are_not_keys(tmp_path, name):
    table, _, key = name.rpartition(".")
    raw = _study(**{table: {key: "."}}) if table else {**_study(), key: "."}
    with pytest.raises(SpecError):
        spec.load_study(_write(tmp_path, raw))


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.glob("*.md") if p.name != "README.md")


def test_readme_is_short_and_names_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, "the README is one or two screens: move the rest to docs/"
    index = (DOCS / "README.md").read_text()
    assert _pages()
    for page in _pages():
        assert f"(docs/{page.name})" in readme, f"README.md links no docs/{page.name}"
        assert f"({page.name})" in index, f"docs/README.md links no {page.name}"


@pytest.mark.parametrize("doc", [REPO / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_at_files(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        path = (doc.parent / target.partition("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(REPO)} links {target}, which is not there"


def test_the_routing_example_names_the_folder_dsnas_route_writes():
    """`dsnas route STUDY.toml` writes routes/STUDY beside the study file, as report and export write theirs: the
    page's example verified and loaded routes/images from the repository, where there is none (dsnas verify:
    "no such bundle folder")."""
    study = spec.load_study(REPO / "studies" / "images.toml")
    written = (study.base_dir / "routes" / study.name).relative_to(REPO).as_posix()
    example = (DOCS / "routing.md").read_text().split("```")[1]
    assert f"dsnas verify {written} " in example and f"load_route('{written}')" in example
    assert re.findall(r"(?<![\w/])routes/", example) == [], "a route folder named without the study file's folder"


def _synopsis() -> dict[str, str]:
    """docs/usage.md's first code block: each command's lines (a line indented under it continues it)."""
    block = (DOCS / "usage.md").read_text(encoding="utf-8").split("```")[1]
    commands: dict[str, str] = {}
    for line in block.strip().splitlines():
        if line.startswith("dsnas "):
            name = line.split()[1]
            commands[name] = ""
        commands[name] += " " + line.partition("#")[0]
    return commands


def test_usage_names_every_option_of_every_command_with_its_default():
    """docs/usage.md is "every command and its options": each option the parser takes is in its command's
    synopsis, a default the parser gives shown there as the value (or the first of the choices), and the options
    taken before the command (--debug, -v, -q, --version) are on the page."""
    from dsnas.cli import build_parser

    parser = build_parser()
    commands = _synopsis()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands) == set(sub.choices), "a command of the parser is not in usage.md's synopsis, or one too many"
    for name, command in sub.choices.items():
        for action in command._actions:
            flag = max(action.option_strings, key=len, default=None)
            if flag is None or flag == "--help":
                continue
            assert re.search(rf"{flag}(?![\w-])", commands[name]), f"usage.md: `dsnas {name}` lacks {flag}"
            if action.default is None or isinstance(action.default, bool):
                continue
            shown = re.search(rf"\[{flag} ([^\]\s]+)\]", commands[name])
            assert shown and shown.group(1).split("|")[0] == str(action.default), \
                f"usage.md: `dsnas {name} {flag}` defaults to {action.default}, the synopsis shows {shown and shown[1]}"
    page = (DOCS / "usage.md").read_text(encoding="utf-8")
    for action in parser._actions:
        for flag in action.option_strings:
            if flag not in ("-h", "--help"):
                assert f"`{flag}" in page or f" {flag}`" in page, f"usage.md does not name dsnas {flag}"


def test_own_model_names_every_built_in_task():
    """docs/own-model.md's task section said `[task] name` is "the built-in task ("charlm")", with images built in too."""
    from dsnas.tasks import BUILTIN_TASKS

    section = (DOCS / "own-model.md").read_text(encoding="utf-8").split("## Your own task")[1].split("\n## ")[0]
    for name in BUILTIN_TASKS:
        assert f'`"{name}"`' in section, f"own-model.md's [task] name section does not name the built-in task {name}"
