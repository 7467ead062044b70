# The README's two commands: `make book` and `make test`. Both create .venv and install on first use.
# Real data:  make book CORONAHACK_DIR=/path/to/coronahack EXTRA_COVID_DIR=/path/to/covid-chestxray-dataset
#             (+ CHESTXRAY14_DIR=/path/to/ChestX-ray14 or CHEST_INIT=chexnet:PATH for the chest-X-ray arm)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= quick
CORONAHACK_DIR ?=
EXTRA_COVID_DIR ?=
CHESTXRAY14_DIR ?=
CHEST_INIT ?=
SEEDS ?=
EXTRA_COVID_AXIS ?=
EXECUTOR ?=
CONCURRENT ?= 1
RUN_ROOT ?= runs/$(PROFILE)
DATA_ARGS := --coronahack-dir "$(CORONAHACK_DIR)" --extra-covid-dir "$(EXTRA_COVID_DIR)"
MATRIX_ARGS := --chestxray14-dir "$(CHESTXRAY14_DIR)" --chest-init "$(CHEST_INIT)" --concurrent $(CONCURRENT) \
  $(if $(SEEDS),--seeds $(SEEDS)) $(if $(EXTRA_COVID_AXIS),--extra-covid-axis $(EXTRA_COVID_AXIS)) \
  $(if $(EXECUTOR),--executor $(EXECUTOR))
CHROMIUM := /usr/bin/chromium

.PHONY: install book runs notebooks test unit nbval check-book bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# The run matrix into $(RUN_ROOT)/<data tag>/ (skips runs already complete with the same parameters and data).
# A failed run is kept (status file, executed notebook) and shown as failed in the results chapter;
# arms that cannot run here (no ImageNet file, no real chest-X-ray init) are listed in matrix.json.
runs: $(STAMP)
	$(PY) -m cxrlib.runs --profile $(PROFILE) --run-root $(RUN_ROOT) $(DATA_ARGS) $(MATRIX_ARGS) \
	  || echo "some runs failed: see their status files and the results chapter"

# Execute the chapter notebooks for the book (from the run folder; nothing is retrained).
notebooks: runs
	$(PY) -m cxrlib.runs --book --profile $(PROFILE) --run-root $(RUN_ROOT) $(DATA_ARGS)

book: notebooks
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html"

unit: $(STAMP)
	$(PY) -m pytest tests -q -m "not book"

nbval: $(STAMP)
	$(PY) -m pytest --nbval-lax notebooks -q --nbval-current-env -p no:cacheprovider

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

check-book: $(CHROMIUM) $(STAMP)
	$(PY) -m pytest tests -q -m book

# Order matters: nbval re-executes the committed notebooks against the run folder that `book` filled.
test: unit book nbval check-book

bench: $(STAMP)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py

clean:
	rm -rf _build book/generated
