PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c constraints.txt -e '.[test,data,gcs]'
	touch $(STAMP)

install: $(STAMP)

# Everything, the slow end-to-end checks included (what CI runs).
test: $(STAMP)
	$(PY) -m ruff check exgra_jax tests tools launch configs
	$(PY) -m pytest -q -n 2 --dist loadfile -m 'slow or not slow'

# The quick inner loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check exgra_jax tests tools launch configs

demo: $(STAMP)
	bash launch/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info
