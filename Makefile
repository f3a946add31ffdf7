# Every target works from a fresh clone: the first one run creates .venv (VENV=/path for another).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FINER := $(BIN)/finer
PIP := $(BIN)/python -m pip install --quiet

# torch + torchvision, one matched pair from one index. Empty: the default (CUDA) build where nvidia-smi
# runs; elsewhere the CPU wheel index if it answers within 5 s (else pip spends minutes retrying it, or
# pairs a local find-links torch with an index's torchvision), else the default index. A CUDA version:
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu124`.
TORCH_INDEX ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

# Defaults run on the embedded offline demo; override on the command line, e.g.
#   make build-dataset SOURCE=cub200 ROOT=/data/CUB_200_2011 OUT=data/cub200 ARGS=--no-knowledge
SOURCE ?= demo
ROOT ?=
OUT ?= data/$(SOURCE)
ARGS ?=

.PHONY: install test lint format build-dataset finetune eval demo shell clean

install: $(STAMP)

# torch and torchvision are installed together before the package, so that pip resolves them as a pair
# (torchvision pins its torch) from the one index chosen above; a torch or torchvision already there that
# does not import with the other is removed first (pip would keep it). The last step imports both, since a
# pair from two builds (a +cpu torch beside a CUDA torchvision) installs fine and only fails at import.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch, torchvision" 2>/dev/null; then \
	  echo "torch + torchvision: already installed in $(VENV)"; \
	else \
	  $(BIN)/python -m pip uninstall --quiet --yes torch torchvision 2>/dev/null; \
	  if [ -n "$(TORCH_INDEX)" ]; then \
	    echo "torch + torchvision from $(TORCH_INDEX)"; \
	    $(PIP) torch torchvision --index-url "$(TORCH_INDEX)"; \
	  elif command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "torch + torchvision: the default (CUDA) build, nvidia-smi found"; \
	    $(PIP) torch torchvision; \
	  else \
	    echo "torch + torchvision: no nvidia-smi, trying the CPU build from $(TORCH_CPU_INDEX)"; \
	    $(BIN)/python -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" 2>/dev/null \
	      && $(PIP) torch torchvision --index-url $(TORCH_CPU_INDEX) --timeout 5 --retries 0 \
	      && $(BIN)/python -c "import torch, torchvision" 2>/dev/null \
	      || { echo "torch + torchvision: the CPU index is unreachable or gave no working pair; the default build"; \
	           $(BIN)/python -m pip uninstall --quiet --yes torch torchvision 2>/dev/null; \
	           $(PIP) torch torchvision; }; \
	  fi; \
	fi
	$(PIP) -e ".[dev]"
	@err=$$($(BIN)/python -c "import torch, torchvision" 2>&1 >/dev/null) || { \
	  echo "make install: torch and torchvision in $(VENV) do not import together ($$(echo "$$err" | tail -n 1)); pick one index for both: make install TORCH_INDEX=https://download.pytorch.org/whl/<cpu|cu124|...>" >&2; \
	  exit 1; }
	@$(BIN)/python -c "import torch, torchvision; print(f'torch {torch.__version__} + torchvision {torchvision.__version__} in $(VENV), CUDA available: {torch.cuda.is_available()}')"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/pytest -n auto $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

build-dataset: $(STAMP)
	$(FINER) build $(SOURCE) --out $(OUT) $(if $(ROOT),--root $(ROOT)) --overwrite $(ARGS)

# The demo-tiny recipe: a tiny random-weight LLaVA learns data/demo on a CPU, adapter in runs/demo-lora
# (an earlier adapter there stays until the new one is complete, then is replaced; finetune says so).
finetune: $(STAMP)
	test -f data/demo/build.json || $(FINER) build demo --out data/demo --overwrite
	$(FINER) finetune --config demo-tiny $(if $(MODEL),--model $(MODEL)) $(ARGS)

# With no MODEL: the demo adapter from `make finetune` when it exists, asked as it was trained (the finer
# conversation replayed, images cropped to their boxes), else the base tiny model (fastest on one thread: its
# matrices are too small to split, and idle threads spin on a busy CPU).
DEMO_MODEL = runs/tiny-llava $$(test -f runs/demo-lora/adapter_config.json \
  && echo --adapter runs/demo-lora --mode finer --crop-to-bbox --max-new-tokens 128 || echo --max-new-tokens 32)
# It says which model it evaluates, and refuses a runs/demo-lora without its adapter files rather than
# silently scoring the base model.
eval: $(STAMP)
	@if [ -n "$(MODEL)" ]; then echo "make eval: evaluating $(MODEL)"; \
	elif [ -e runs/demo-lora ] && ! [ -f runs/demo-lora/adapter_model.safetensors \
	  -a -f runs/demo-lora/adapter_config.json ]; then \
	  echo "make eval: runs/demo-lora is incomplete (no adapter_model.safetensors or adapter_config.json);" \
	    "run make finetune again, or remove runs/demo-lora to evaluate the untrained base model" >&2; exit 1; \
	elif [ -e runs/demo-lora ]; then echo "make eval: evaluating the demo adapter runs/demo-lora on runs/tiny-llava"; \
	else echo "make eval: no runs/demo-lora (make finetune trains it): evaluating the untrained runs/tiny-llava"; fi
	test -d data/demo || $(FINER) build demo --out data/demo
	test -n "$(MODEL)" || test -d runs/tiny-llava \
	  || $(BIN)/python -c "from finer.testing import build_tiny_vlm; build_tiny_vlm('llava', 'runs/tiny-llava')"
	$(if $(MODEL),,OMP_NUM_THREADS=1) $(FINER) eval --dataset data/demo --model $(or $(MODEL),$(DEMO_MODEL)) \
	  --out runs/demo-eval $(ARGS)

demo: build-dataset
	$(FINER) info $(OUT)

# A bash with .venv active (your ~/.bashrc first, then `source .venv/bin/activate`), so that the README's
# `finer ...` and `python ...` lines run as written; `exit` leaves it. It installs a missing .venv but never
# reinstalls one because pyproject.toml changed (`make install` does).
shell:
	@test -f $(STAMP) || $(MAKE) --no-print-directory install VENV=$(VENV)
	@printf '[ -f ~/.bashrc ] && . ~/.bashrc\n. "%s/activate"\n' "$(abspath $(BIN))" > $(VENV)/.shellrc
	@echo "make shell: $(VENV) is active in this shell; exit to leave it"
	@bash --rcfile $(VENV)/.shellrc -i

clean:
	rm -rf $(VENV) data/demo runs .pytest_cache .ruff_cache
