# spvr_lib: `make reproduce` regenerates every table and figure; `make test` runs the test suite.
SCALE ?= cpu
ONLY ?=
# where reproduce's independent trainings run: local (one single-thread process per core) or slurm (job arrays,
# sized by SLURM_PARTITION, SLURM_TIME (minutes), SLURM_CPUS, SLURM_GPUS, SLURM_MEM, SLURM_LOGS: README, "Slurm")
EXECUTOR ?=
SLURM_OPTS := $(if $(SLURM_PARTITION),--slurm-partition $(SLURM_PARTITION)) $(if $(SLURM_TIME),--slurm-time $(SLURM_TIME)) \
	$(if $(SLURM_CPUS),--slurm-cpus $(SLURM_CPUS)) $(if $(SLURM_GPUS),--slurm-gpus $(SLURM_GPUS)) \
	$(if $(SLURM_MEM),--slurm-mem $(SLURM_MEM)) $(if $(SLURM_LOGS),--slurm-logs $(SLURM_LOGS))
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv lock data test reproduce pin lab bench gpu-check clean

help: ## show this help (each target and what it does)
	@echo "usage: make <target> [SCALE=smoke|cpu|cpu-full|paper] [ONLY='01 03'] [EXECUTOR=local|slurm]"
	@echo "       EXECUTOR=slurm submits reproduce's trainings as Slurm job arrays (SLURM_PARTITION, SLURM_TIME in minutes,"
	@echo "       SLURM_CPUS, SLURM_GPUS, SLURM_MEM, SLURM_LOGS size them); EXECUTOR=local (default) uses this machine's cores"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 14

# the exact versions come from requirements.lock; spvr_lib itself goes in editable, without re-resolving
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install spvr_lib with its dependencies

# requirements.lock pins every package that `pip install -e '.[dev]'` needs (Linux x86_64, Python 3.11), resolved from
# pyproject.toml's ranges under the machine's pip constraints; pip-tools lives in a throwaway venv under /tmp.
# A plain `make lock` keeps the current pins and only adds or changes what pyproject.toml now asks for;
# `make lock UPGRADE=1` moves every pin to the newest release allowed.
LOCK_PYTHON ?= python3.11
LOCK_VENV := /tmp/spvr-lock-tool
LOCK_CONSTRAINTS := /etc/xdg/pip/constraints.txt
lock: ## regenerate requirements.lock from pyproject.toml (pip-compile; UPGRADE=1 moves every pin to the newest release)
	rm -rf $(LOCK_VENV)
	$(LOCK_PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==26.3 pip-tools==7.6.2
	$(LOCK_VENV)/bin/pip-compile $(if $(UPGRADE),--upgrade) --allow-unsafe --constraint=$(LOCK_CONSTRAINTS) --extra=dev --no-emit-find-links --no-emit-index-url --output-file=requirements.lock --strip-extras pyproject.toml
	rm -rf $(LOCK_VENV)

data: $(STAMP) ## make sure Fashion-MNIST is available (system package, data/, or download)
	$(PY) -m spvr_lib.data ensure fashion-mnist

# one process per core (pytest-xdist), each with one thread (the smoke networks are tiny); a test file runs in one
# process, so a file's cached models and its Slurm cluster are built once
TEST_WORKERS ?= auto
test: $(STAMP) data ## run unit tests and every notebook at smoke scale (nbmake), one process per core
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests --nbmake notebooks

# the smoke and cpu scales read Fashion-MNIST; the paper scale reads only the paper's datasets (checked by the runner)
NEEDS_FMNIST := $(if $(filter paper,$(SCALE)),,data)

reproduce: $(STAMP) $(NEEDS_FMNIST) ## run the numbered notebooks at SCALE (default cpu) on EXECUTOR, outputs in figures/$(SCALE)/
	$(PY) -m spvr_lib.reproduce --scale $(SCALE) $(if $(ONLY),--only $(ONLY)) $(if $(EXECUTOR),--executor $(EXECUTOR)) $(SLURM_OPTS)

# the committed run cache of a scale is what its run account lists: the records its figures use and the weights a
# later computation reads (data/ is otherwise ignored; data/README.md says what is and is not committed)
pin: $(STAMP) ## stage exactly the records and weights figures/$(SCALE)/reproduce_run.json lists (the rest of data/ leaves the index)
	$(PY) -m spvr_lib.reproduce --pin --scale $(SCALE)

bench: $(STAMP) $(NEEDS_FMNIST) ## time naive vs fast ranking on each model at SCALE (JSON lines)
	for m in vgg16 resnet34 resnet50; do $(PY) -m spvr_lib.bench ranking --model $$m --scale $(SCALE) --json; done

gpu-check: $(STAMP) ## on a CUDA machine: training with bf16, fast vs naive ranking, CUDA-event latency, DDP (JSON lines, < 5 min)
	timeout 300 $(PY) -m spvr_lib.paper.gpu_check

lab: $(STAMP) ## open JupyterLab on the notebooks with the project's .venv
	$(VENV)/bin/jupyter lab notebooks

clean: ## remove build/ and executed notebooks; CLEAN_CACHE=1 also drops cached runs in data/
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	$(if $(CLEAN_CACHE),rm -rf data/runs data/checkpoints,)
