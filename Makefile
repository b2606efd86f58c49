# The README's two commands: `make quickstart` (run the quickstart study) and `make test` (run the tests).
# Both create .venv and install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Extra pip options for torch, e.g. an --index-url of CPU-only wheels on a machine whose default is a CUDA build.
TORCH_PIP_ARGS ?=

.PHONY: quickstart test clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# Without an NVIDIA GPU, install torch's CPU build before the project: a plain `torch` requirement
	@# would pull a CUDA build of several GB.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS); fi
	$(PY) -m pip install -q -e ".[test]"
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/dsnas search studies/quickstart.toml

test: $(VENV)/.installed
	$(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
