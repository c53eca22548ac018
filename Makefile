# make run      set up .venv (once) and serve on 0.0.0.0:8000
# make test     set up .venv (once) and run the whole test suite offline
# make install  set up .venv only
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REQUIREMENTS := requirements.txt requirements-nodeps.txt requirements-test.txt

export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: install run test clean

install: $(STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade "pip>=24"
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $(STAMP)

run: $(STAMP)
	$(PY) server.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 server_test.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
