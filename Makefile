# Every target works from a fresh clone: the first one run creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FINER := $(BIN)/finer

# Defaults run on the embedded offline demo; override on the command line, e.g.
#   make build-dataset SOURCE=cub200 ROOT=/data/CUB_200_2011 OUT=data/cub200 ARGS=--no-knowledge
SOURCE ?= demo
ROOT ?=
OUT ?= data/$(SOURCE)
ARGS ?=

.PHONY: install test lint format build-dataset finetune eval demo clean

install: $(STAMP)

# Torch first, so that a machine without a GPU never pulls the CUDA wheels: a wheel in pip's local
# find-links wins, else the CPU index where no NVIDIA driver is present, else the default (CUDA) build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet --no-index "torch>=2.6" 2>/dev/null \
	  || { command -v nvidia-smi >/dev/null \
	       && $(BIN)/python -m pip install --quiet "torch>=2.6" \
	       || $(BIN)/python -m pip install --quiet "torch>=2.6" --index-url https://download.pytorch.org/whl/cpu; }
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/pytest

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

clean:
	rm -rf $(VENV) data/demo runs .pytest_cache .ruff_cache
