# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install demo demo-frontier test lint

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build (it lies on this project's machines); on a GPU machine, install your own CUDA
# build of torch into the venv first: the ranges in pyproject.toml then keep it.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $@

# CPU threads of the demo: one, whatever the machine. The tiny model gains nothing from a second thread, and on a
# busy machine OpenMP threads spin-wait for each other: with one of two cores busy, two threads train the demo
# several times slower than one (`python scripts/bench_demo.py`, numbers in the README). Passing the count also keeps
# accelerate from printing which defaults it used. The demo starts over each time (--overwrite_output_dir).
# DEMO_ARGS: more training flags, e.g. DEMO_ARGS="--max_steps 20".
CPU_THREADS ?= 1
DEMO_ARGS ?=

demo: install
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate/cpu.yaml --num_cpu_threads_per_process $(CPU_THREADS) \
		scripts/grpo_t2i.py --config recipes/tiny/cpu_demo.yaml --divergence js --overwrite_output_dir true $(DEMO_ARGS)

# What the project is for, on the tiny model: JS and reverse KL trained at three curvature-matched betas each (and once
# without a penalty) at lr 3e-4 and 4 prompts × 8 images per step, evaluated with the same prompts and noise, the
# frontier drawn and each divergence's diversity printed at matched rewards (README: "What the penalty is for").
# FRONTIER_ARGS: more flags of scripts/frontier_t2i.py.
FRONTIER_ARGS ?=

demo-frontier: install
	OMP_NUM_THREADS=$(CPU_THREADS) $(PYTHON) scripts/frontier_t2i.py --divergences reverse_kl js --betas 0 0.03 0.1 0.3 \
		--training_overrides per_device_train_batch_size=32 --output_dir outputs/demo-frontier $(FRONTIER_ARGS)

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
