# rpnlab: `make run` and `make test` each set up the virtual environment first when it is
# missing or older than pyproject.toml, then do their job.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Empty: a fresh timestamped folder under runs/ for every run.
RUN_OUT ?=
# Two workers on two cores: each keeps torch to one thread so they do not fight.
TEST_WORKERS ?= 2

.PHONY: setup run test smoke lint fmt check bench bench-browser bench-detector gpu-check wheelhouse clean lab results prepare

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (rpnlab)"
	@touch $(STAMP)

## The whole notebook collection on the embedded data, full size, into runs/<timestamp>/
run: $(STAMP)
	$(VENV)/bin/rpnlab run $(if $(RUN_OUT),--out $(RUN_OUT))

## Ahead of a workshop: train the course RPN that notebooks 04, 05 and 07 load and 07's Fast R-CNN head (cached in data/cache/course/)
prepare: $(STAMP)
	$(PY) -m rpnlab.lab.stage_training

## Every test: unit, reference (vs torchvision), notebooks (smoke size)
test: $(STAMP)
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

## The collection in smoke size (what CI checks), for a quick look
smoke: $(STAMP)
	$(VENV)/bin/rpnlab run --smoke --out runs/smoke

lint: $(STAMP)
	$(VENV)/bin/ruff check rpnlab tests benchmarks

NOTEBOOKS := $(wildcard notebooks/[0-9][0-9]_*.ipynb)

## Bring each notebook pair together (the newer file wins), strip unguarded outputs, fix lint
fmt: $(STAMP)
	$(VENV)/bin/jupytext --sync $(NOTEBOOKS)
	$(PY) -m rpnlab.lab.nbclean clean $(NOTEBOOKS)
	$(VENV)/bin/ruff check --fix rpnlab tests benchmarks

## What the pre-commit hooks check, without pre-commit: pairs in sync, notebooks clean, lint
check: $(STAMP)
	$(PY) -m rpnlab.lab.nbclean check $(NOTEBOOKS)
	$(VENV)/bin/ruff check rpnlab tests benchmarks

## rpnlab vs torchvision operation by operation (CPU, 1 thread), then the explorers' change-to-figure times: tables printed, CSV/JSON in runs/bench/
bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py --out runs/bench --markdown runs/bench/bench_ops.md
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) benchmarks/bench_explorers.py --out runs/bench

## Explorer latency in headless Chromium (Playwright, Debian's chromium): input event -> new figure in the page; CSV/JSON in runs/bench/
bench-browser: $(STAMP)
	$(PY) benchmarks/bench_browser.py --out runs/bench

## The whole-detector benchmark: both detectors trained for the same time budget, then mAP
bench-detector: $(STAMP)
	$(PY) benchmarks/bench_detector.py

## Notebook 09's ablations (3 seeds, RPN recall), written under docs/results/ (RESULTS_ARGS=--quick: a minute)
results: $(STAMP)
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(PY) benchmarks/results.py $(RESULTS_ARGS)

# Root containers (workshops) need --allow-root; the project's Lab settings live in .jupyter/.
LAB_ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888

## JupyterLab on notebooks/ (no browser opened: follow the printed link), news pop-up off
lab: $(STAMP)
	JUPYTER_CONFIG_PATH="$(CURDIR)/.jupyter$${JUPYTER_CONFIG_PATH:+:$$JUPYTER_CONFIG_PATH}" \
	$(VENV)/bin/jupyter lab --no-browser $(LAB_ROOT_FLAG) --ip=$(LAB_IP) --port=$(LAB_PORT) \
		--ServerApp.root_dir="$(CURDIR)/notebooks"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

.PHONY: instructor
INSTRUCTOR_OUT ?= runs/instructor
## The instructor edition: the notebooks with exercises (01-07, 10) with the exercises' solutions filled in, into runs/instructor/
instructor: $(STAMP)
	$(PY) -m rpnlab.lab.exercises.instructor --out $(INSTRUCTOR_OUT)
## Offline GPU check, step 1 on a connected machine: the dependencies but torch into wheelhouse/
wheelhouse:
	$(PYTHON) benchmarks/gpu_check.py wheelhouse --dest wheelhouse

## Offline GPU check, step 2 on the GPU machine (torch with CUDA installed): report in runs/gpu-check/
gpu-check:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py run
