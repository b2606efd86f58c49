"""From the wheel, not the source tree: `dsnas init` writes a working study and `dsnas search` runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_init_and_search_from_a_non_editable_install(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("dsnas-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def dsnas(*args):
        code = "import sys, dsnas.cli; print('from', dsnas.cli.__file__); sys.exit(dsnas.cli.main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)

    init = dsnas("init", "mystudy")
    assert init.returncode == 0, init.stderr
    assert f"from {site}" in init.stdout  # the installed copy ran, not the source tree
    assert (work / "mystudy" / "studies" / "quickstart.toml").is_file()
    assert (work / "mystudy" / "search_spaces" / "transformer_lm.toml").is_file()
    assert dsnas("init", "mystudy").returncode == 2  # never overwrites without --force

    run = dsnas("search", "mystudy/studies/quickstart.toml", "--executor", "local", "--n-trials", "1")
    assert run.returncode == 0, run.stderr
    assert "1 trials completed" in run.stdout and "Pareto front" in run.stdout
    assert (work / "mystudy" / "studies" / "quickstart.db").is_file()
