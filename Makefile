# Two entry points a fresh machine needs: `make demo` (main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m hybrid run

# Simulator on so CUDA kernels run on the CPU; -p no:cacheprovider keeps the tree clean;
# -n auto: one pytest worker per core.
test: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q -p no:cacheprovider -n auto

clean:
	rm -rf $(VENV) build *.egg-info
