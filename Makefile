# make run      set up .venv (once) and serve on 0.0.0.0:8000
# make lint     ruff's lint and format check, then mypy (settings in pyproject.toml)
# make test     set up .venv (once), make lint, then the whole test suite offline
# make install  set up .venv (and Debian's chromium and haproxy for the tests) only
# make gpu-check  on a CUDA machine: tests, every option's warm-up, syncs, kernels, speed, bench -> one table
# make image-check [IMAGE_BASE=IMAGE]  as root: build the Docker image on a debootstrapped Debian base (or IMAGE),
#                run it with Piper as a user would (speech, health, voices volume, SIGTERM drain), remove it all
# make golden [GOLDEN_AT=REV]  record every seeded transport's bytes on this machine (golden/outputs.json),
#                as REV's server makes them (default: the working tree); the test suite compares against them
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The vendors' official SDKs (sdk_test.py): a virtualenv of their own, their pins clash with ours
SDK_VENV := .cache/sdk-venv
SDK_STAMP := $(SDK_VENV)/.requirements
TEST_MODULES := server_test.py adapters_test.py sdk_test.py tools_test.py golden_test.py text_frontend_test.py \
	timestamps_test.py deploy_test.py scaleout_test.py
REQUIREMENTS := requirements.txt requirements-nodeps.txt requirements-test.txt
# The browser tests drive Debian's chromium; Playwright must never download its own.
CHROMIUM := /usr/bin/chromium
# The multi-replica tests run Debian's haproxy in front of the replicas (deploy/haproxy/haproxy.cfg).
HAPROXY := /usr/sbin/haproxy
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: install run lint test gpu-check image-check golden clean

install: $(STAMP) $(CHROMIUM) $(HAPROXY) $(SDK_STAMP)

$(STAMP): $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade "pip>=24"
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $(STAMP)

$(SDK_STAMP): tools/sdk-requirements.txt $(STAMP)
	$(PY) -m venv --clear $(SDK_VENV)
	$(SDK_VENV)/bin/pip install --disable-pip-version-check -q -r tools/sdk-requirements.txt
	cp tools/sdk-requirements.txt $@

$(CHROMIUM):
	if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; \
	else echo "No apt-get here: the browser tests need Chromium at $(CHROMIUM)." >&2; fi

$(HAPROXY):
	if command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends haproxy; \
	else echo "No apt-get here: the scale-out tests need HAProxy at $(HAPROXY)." >&2; fi

run: $(STAMP)
	$(PY) server.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint $(CHROMIUM) $(HAPROXY) $(SDK_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --durations=15 --timeout=300 --timeout-method=thread $(TEST_MODULES) $(PYTEST_ARGS)

gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# Not part of test: minutes, root (apt-get, dockerd, debootstrap) and several GB; standard library only, no .venv.
image-check:
	$(SUDO) $(PYTHON) tools/image_check.py $(if $(IMAGE_BASE),--base $(IMAGE_BASE)) $(IMAGE_CHECK_ARGS)

GOLDEN_SOURCE := .cache/golden-source
golden: $(STAMP)
	rm -rf $(GOLDEN_SOURCE) && git worktree prune
	$(if $(GOLDEN_AT),git worktree add -q --detach $(GOLDEN_SOURCE) $(GOLDEN_AT),mkdir -p $(GOLDEN_SOURCE))
	GOLDEN_RECORD=1 GOLDEN_COMMIT=$$(git rev-parse --short $(or $(GOLDEN_AT),HEAD)) \
	  SERVER_SOURCE=$(if $(GOLDEN_AT),$(GOLDEN_SOURCE),.) HF_HUB_OFFLINE=1 \
	  $(PY) -m pytest -q -p no:cacheprovider --timeout=600 golden_test.py
	rm -rf $(GOLDEN_SOURCE) && git worktree prune

clean:
	rm -rf $(VENV) .cache .pytest_cache
