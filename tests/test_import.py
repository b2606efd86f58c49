"""Importing dsnas starts nothing and touches no hardware."""

from __future__ import annotations

import subprocess
import sys


def test_import_dsnas_loads_no_heavy_module():
    code = ("import sys, dsnas, dsnas.cli, dsnas.errors; "
            "print(sorted(m for m in ('torch', 'ray', 'pynvml', 'optuna', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dsnas_search_stays_the_api_function_after_the_driver_module_is_imported():
    import dsnas
    from dsnas.search import run_study

    assert callable(dsnas.search) and dsnas.search.__module__ == "dsnas"
    assert run_study.__module__ == "dsnas.search"
