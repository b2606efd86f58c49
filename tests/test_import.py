"""Importing dsnas starts nothing and touches no hardware."""

from __future__ import annotations

import subprocess
import sys


def test_import_dsnas_loads_no_heavy_module():
    code = ("import sys, dsnas, dsnas.cli, dsnas.errors; "
            "print(sorted(m for m in ('torch', 'ray', 'pynvml', 'optuna', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # The documented modules, on first use: `dsnas.results.load` was an AttributeError after a plain `import dsnas`.
    code = "import dsnas; print(dsnas.results.load.__name__, dsnas.export.read_probe.__name__, dsnas.run.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["load", "read_probe", "dsnas.run"]


def test_dsnas_search_is_the_api_function_and_the_driver_module_has_its_own_name():
    import dsnas
    from dsnas.run import run_study

    assert callable(dsnas.search) and dsnas.search.__module__ == "dsnas"
    assert run_study.__module__ == "dsnas.run"


def test_imports_run_one_way_as_the_import_linter_contract_says():
    """pyproject.toml's [tool.importlinter] layers: an import that runs back up (a cycle in the making) fails here."""
    import shutil
    from pathlib import Path

    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([lint, "--no-cache"], cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0 and "1 kept, 0 broken" in run.stdout, run.stdout + run.stderr


def test_every_deferred_import_says_why_it_is_deferred():
    """An import inside a function is there to keep start-up light (torch, SQLAlchemy, numpy load on first use);
    each says so on its line, so that one deferred for no reason (or to hide a cycle) stands out. The command line
    defers every command's imports, as its module comment says."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "dsnas"
    silent = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix() in ("cli.py", "__init__.py"):
            continue
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and (node.module or "").startswith("dsnas"):
                said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not said:
                    silent.append(f"{path.relative_to(package.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not silent, "deferred imports without a reason:\n" + "\n".join(silent)


def test_every_text_file_is_read_and_written_as_utf_8():
    """The locale's encoding was used: under a Latin-1 locale export and report stopped at an em dash (and report
    emptied the last report's plotly.min.js), and a UTF-8 study file was refused as invalid TOML."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "dsnas"
    bare = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("read_text", "write_text") and \
                    not any(k.arg == "encoding" for k in node.keywords):
                bare.append(f"{path.relative_to(package.parent)}:{node.lineno}: .{node.func.attr}() without encoding")
    assert not bare, "\n".join(bare)
