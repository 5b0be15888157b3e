# The README's two commands. Each creates .venv when missing and installs the project into it,
# with the exact tested versions of constraints/cpu.txt (pyproject.toml itself holds ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints/cpu.txt
# An extra index for torch when .venv has none yet, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# for the CPU build (PyPI's torch is a CUDA build). Empty by default: pip's own configuration decides,
# which on the project's machines finds the local CPU wheel of the pinned version.
TORCH_INDEX ?=

.PHONY: demo test install constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || \
		$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -c $(CONSTRAINTS) torch
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sipo demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Rewrite the constraints from what .venv holds now (after adding or upgrading a dependency).
constraints: $(STAMP)
	{ sed -n '/^#/p' $(CONSTRAINTS); $(BIN)/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' | grep -v '^#'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) runs build dist *.egg-info src/*.egg-info
