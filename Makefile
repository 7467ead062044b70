# The README's two commands: `make book` and `make test`. Both create .venv and install on first use.
#   make book                    renders the committed results bundle $(BUNDLE): no data, GPU or training
#   make book PROFILE=quick      executes everything on the synthetic default into a new bundle, renders it
#   make book CORONAHACK_DIR=/path/to/coronahack EXTRA_COVID_DIR=/path/to/covid-chestxray-dataset [PROFILE=paper]
#                                executes on real data into a new bundle, renders it
#             (+ CHESTXRAY14_DIR=/path/to/ChestX-ray14 or CHEST_INIT=chexnet:PATH for the chest-X-ray arm,
#                EXTRA_NEGATIVES_DIR=/path/to/nih-chestxray14-subset for chapter 06's debiasing arms;
#                chapter 04's lungs-removed training arms, AUDIT_VARIANTS, run in every matrix; VARIANTS= skips them)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?=
CORONAHACK_DIR ?=
EXTRA_COVID_DIR ?=
EXTRA_NEGATIVES_DIR ?=
AUDIT_VARIANTS ?= lungs_removed,lungs_removed_marker
COMMA := ,
VARIANTS ?= $(if $(EXTRA_NEGATIVES_DIR),negs$(COMMA)negs+clahe$(COMMA))$(AUDIT_VARIANTS)
VARIANT_LOSSES ?= ce
BUNDLE ?= results/real-cpu-3seeds
EXECUTE := $(strip $(PROFILE)$(CORONAHACK_DIR)$(EXTRA_COVID_DIR))
RUN_PROFILE := $(or $(PROFILE),quick)
NEW_BUNDLE ?= _build/bundle-$(RUN_PROFILE)
CHESTXRAY14_DIR ?=
CHEST_INIT ?=
SEEDS ?=
EXTRA_COVID_AXIS ?=
EXECUTOR ?=
CONCURRENT ?= 1
RUN_ROOT ?= runs/$(RUN_PROFILE)
DATA_ARGS := --coronahack-dir "$(CORONAHACK_DIR)" --extra-covid-dir "$(EXTRA_COVID_DIR)"
MATRIX_ARGS := --chestxray14-dir "$(CHESTXRAY14_DIR)" --chest-init "$(CHEST_INIT)" --concurrent $(CONCURRENT) \
  $(if $(SEEDS),--seeds $(SEEDS)) $(if $(EXTRA_COVID_AXIS),--extra-covid-axis $(EXTRA_COVID_AXIS)) \
  $(if $(EXECUTOR),--executor $(EXECUTOR)) \
  $(if $(VARIANTS),--variants "$(VARIANTS)" --variant-losses $(VARIANT_LOSSES)) \
  $(if $(EXTRA_NEGATIVES_DIR),--extra-negatives "$(EXTRA_NEGATIVES_DIR)" --set external=nih="$(EXTRA_NEGATIVES_DIR)")
CHROMIUM := /usr/bin/chromium

.PHONY: install book bundle runs remedies slurm notebooks test unit nbval check-book bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# The run matrix into $(RUN_ROOT)/<data tag>/ (skips runs already complete with the same parameters and data).
# A failed run is kept (status file, executed notebook) and shown as failed in the results chapter (exit code 1:
# make goes on); any other error (a bad value, exit code 2; Ctrl-C, 130) was printed once and stops make here.
runs: $(STAMP)
	$(PY) -m cxrlib.runs --profile $(RUN_PROFILE) --run-root $(RUN_ROOT) $(DATA_ARGS) $(MATRIX_ARGS); \
	  code=$$?; if [ $$code = 1 ]; then echo "some runs failed: see their status files and the results chapter"; \
	  elif [ $$code != 0 ]; then exit $$code; fi

# Issue 19's remedy arms beside the paper set-up (chapter 06): lungs only, its control (a marker outside the
# lungs, painted away), adults only, both, and lungs only + CLAHE in adults; every arm holds out the ieee8023
# adults without COVID-19 and one country's COVID-19 images (REMEDY_HOLD_OUT) and is scored on the NIH adults.
# Needs real data and EXTRA_NEGATIVES_DIR. The CPU fallback of the committed bundle: binary, CE, 128 px, 2 epochs,
# 2 seeds (the control: seed 0 only). On a GPU: REMEDY_SETTINGS="--set image_size=224 --set epochs=10" etc.
REMEDY_ROOT ?= runs/remedies
REMEDY_HOLD_OUT ?= country=italy;collection=ieee8023&covid=no
REMEDY_VARIANTS ?= lungs_only,adults,adults+lungs_only,adults+lungs_only_clahe
REMEDY_SETTINGS ?= --set image_size=128 --set epochs=2
REMEDY_SEEDS ?= 2
REMEDY_ARGS = --profile quick --run-root $(REMEDY_ROOT) $(DATA_ARGS) --tasks binary --losses ce --arms random \
  --extra-covid-axis with --extra-negatives "$(EXTRA_NEGATIVES_DIR)" --set external=nih="$(EXTRA_NEGATIVES_DIR)" \
  --set "hold_out=$(REMEDY_HOLD_OUT)" $(REMEDY_SETTINGS) --concurrent $(CONCURRENT) $(if $(EXECUTOR),--executor $(EXECUTOR))
remedies: $(STAMP)
	$(PY) -m cxrlib.runs $(REMEDY_ARGS) --seeds $(REMEDY_SEEDS) --variants "$(REMEDY_VARIANTS)"
	$(PY) -m cxrlib.runs $(REMEDY_ARGS) --seeds 1 --variants lungs_only_marker

# The run matrix of `make runs` as a Slurm job array (bench/slurm_matrix.sh): SHARDS tasks of one GPU each, task I
# running the runs at positions I, I+SHARDS, ... of the matrix (runs --shard slurm) into RUN_ROOT, which every node
# must see; DATA holds coronahack/ and covid-chestxray-dataset/. Then the --gather command it prints says what each
# run became, and where.
SHARDS ?= 8
DATA ?=
SLURM_FLAGS = $(if $(CHESTXRAY14_DIR),--chestxray14-dir $(abspath $(CHESTXRAY14_DIR))) \
  $(if $(CHEST_INIT),--chest-init $(CHEST_INIT)) $(if $(EXTRA_COVID_AXIS),--extra-covid-axis $(EXTRA_COVID_AXIS)) \
  $(if $(VARIANTS),--variants $(VARIANTS) --variant-losses $(VARIANT_LOSSES)) \
  $(if $(EXTRA_NEGATIVES_DIR),--extra-negatives $(abspath $(EXTRA_NEGATIVES_DIR)) \
    --set external=nih=$(abspath $(EXTRA_NEGATIVES_DIR)))
GATHER = $(PY) -m cxrlib.runs --gather --profile $(RUN_PROFILE) --run-root $(abspath $(RUN_ROOT)) \
  --coronahack-dir $(abspath $(DATA))/coronahack --extra-covid-dir $(abspath $(DATA))/covid-chestxray-dataset
slurm: $(STAMP)
	@test -n "$(DATA)" || { echo "make slurm: give DATA=, the folder holding coronahack/ and covid-chestxray-dataset/" >&2; exit 2; }
	DATA="$(abspath $(DATA))" RUN_ROOT="$(abspath $(RUN_ROOT))" PROFILE=$(RUN_PROFILE) SEEDS=$(SEEDS) \
	  CONCURRENT=$(CONCURRENT) PYTHON="$(abspath $(PY))" MATRIX_FLAGS="$(strip $(SLURM_FLAGS))" \
	  sbatch --array=0-$$(($(SHARDS) - 1)) bench/slurm_matrix.sh
	@echo "when the array is done: $(GATHER)"

# Execute the chapter notebooks for the book (from the run folder; nothing is retrained).
notebooks: runs
	$(PY) -m cxrlib.runs --book --profile $(RUN_PROFILE) --run-root $(RUN_ROOT) $(DATA_ARGS)

# A results bundle of what `notebooks` executed: run folders without weights, chapters, matrix.json.
bundle: notebooks
	rm -rf $(NEW_BUNDLE)
	$(PY) -m cxrlib.bundle pack "$$($(PY) -m cxrlib.runs --where --run-root $(RUN_ROOT) $(DATA_ARGS))" \
	  $(NEW_BUNDLE) --scratch --chapters book/generated \
	  --data $(CORONAHACK_DIR) $(EXTRA_COVID_DIR) --note "make bundle, profile $(RUN_PROFILE)"

# Render a bundle: its executed chapters go to book/generated/, then Jupyter Book builds (executes nothing).
book: $(if $(EXECUTE),bundle,$(STAMP))
	$(PY) -m cxrlib.bundle render $(if $(EXECUTE),$(NEW_BUNDLE),$(BUNDLE))
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	@echo "book: $(CURDIR)/_build/html/index.html (from $(if $(EXECUTE),$(NEW_BUNDLE),$(BUNDLE)))"

unit: $(STAMP)
	$(PY) -m pytest tests -q -m "not book"

nbval: $(STAMP)
	$(PY) -m pytest --nbval notebooks -q --nbval-current-env -p no:cacheprovider

# Installing Chromium needs root; without it the browser check skips with a message saying so.
$(CHROMIUM):
	-apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || echo "could not install chromium (needs root): the browser check will be skipped"

check-book: $(CHROMIUM) $(STAMP)
	$(PY) -m pytest tests -q -m book

# Both books: the synthetic default executed (then nbval re-executes the committed notebooks against the
# run folder it filled) and the committed bundle rendered; the browser check runs on each.
test: unit
	$(MAKE) book PROFILE=quick
	$(MAKE) nbval
	$(MAKE) check-book
	$(MAKE) book
	$(MAKE) check-book

bench: $(STAMP)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_train.py

clean:
	rm -rf _build book/generated
