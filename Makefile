# spvr_lib: `make reproduce` regenerates every table and figure; `make test` runs the test suite.
SCALE ?= cpu
ONLY ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help venv data test reproduce lab bench clean

help: ## show this help (each target and what it does)
	@echo "usage: make <target> [SCALE=smoke|cpu|paper] [ONLY='01 03']"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## (.*)/  \1\t\2/' | expand -t 14

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv and install spvr_lib with its dependencies

data: $(STAMP) ## make sure Fashion-MNIST is available (system package, data/, or download)
	$(PY) -m spvr_lib.data ensure fashion-mnist

# one thread: the smoke networks are tiny, and two threads per process oversubscribe a 2-core machine
test: $(STAMP) data ## run unit tests and every notebook at smoke scale (nbmake)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests --nbmake notebooks

reproduce: $(STAMP) data ## run the numbered notebooks at SCALE (default cpu), outputs in figures/$(SCALE)/
	$(PY) -m spvr_lib.reproduce --scale $(SCALE) $(if $(ONLY),--only $(ONLY))

bench: $(STAMP) data ## time naive vs fast ranking on each model at SCALE (JSON lines)
	for m in vgg16 resnet34 resnet50; do $(PY) -m spvr_lib.bench ranking --model $$m --scale $(SCALE) --json; done

lab: $(STAMP) ## open JupyterLab on the notebooks with the project's .venv
	$(VENV)/bin/jupyter lab notebooks

clean: ## remove build/ and executed notebooks; CLEAN_CACHE=1 also drops cached runs in data/
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	$(if $(CLEAN_CACHE),rm -rf data/runs data/checkpoints,)
