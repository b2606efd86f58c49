# The README's two commands: `make quickstart` (run the quickstart study) and `make test` (run the tests).
# Both create .venv and install what they need first: the quickstart what dsnas needs to run, the tests that plus
# the test extra (Playwright, pyarrow, onnxruntime, psycopg, ...). A stamp file per install lets `make test` after
# `make quickstart` add only the test extra.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pip options for torch, e.g. an --index-url of CPU-only wheels on a machine whose default is a CUDA build.
TORCH_PIP_ARGS ?=

.PHONY: quickstart test clean-venv

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	@# Without an NVIDIA GPU, install torch's CPU build before the project: a plain `torch` requirement
	@# would pull a CUDA build of several GB.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS); fi
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.created
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/dsnas search studies/quickstart.toml

test: $(VENV)/.installed-test
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
