# llmctl: `make demo` runs the whole pipeline on the built-in corpus, `make test` the test suite.
# Both create .venv on first use. Override TORCH_SPEC for a GPU build, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmctl-installed
DEMO_RECIPE ?= recipes/tiny-gpt.yaml
# Two workers, one file per worker at a time (module fixtures stay per file); override for a bigger machine.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test bench completions clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/llmctl prepare $(DEMO_RECIPE)
	$(BIN)/llmctl train $(DEMO_RECIPE) --overwrite
	$(BIN)/llmctl eval runs/tiny-gpt/model --prompt "def fib(n):" --prompt "class Stack:" --max-new-tokens 48
	$(BIN)/llmctl tune recipes/tiny-gpt-tune.yaml --trials 4
	$(BIN)/llmctl compress runs/tiny-gpt/model --prune 0.3 --quantize int8 -o out/tiny-int8 --overwrite
	$(BIN)/llmctl export runs/tiny-gpt/model --quantize int8 -o out/tiny-onnx --overwrite
	$(BIN)/llmctl eval --compare runs/tiny-gpt/model out/tiny-int8 out/tiny-onnx
	$(BIN)/llmctl export runs/tiny-gpt/model --format hf -o out/tiny-hf --overwrite
	$(BIN)/llmctl report runs/tiny-gpt
	$(BIN)/python scripts/demo_serve.py runs/tiny-gpt/model out/tiny-onnx
	$(BIN)/llmctl train recipes/sentiment-rnn.yaml --overwrite
	$(BIN)/llmctl eval runs/sentiment-rnn/model
	$(BIN)/llmctl compress runs/sentiment-rnn/model --quantize int8 -o out/sentiment-int8 --overwrite
	$(BIN)/llmctl export runs/sentiment-rnn/model --quantize int8 -o out/sentiment-onnx --overwrite
	$(BIN)/llmctl eval --compare runs/sentiment-rnn/model out/sentiment-int8 out/sentiment-onnx
	$(BIN)/python scripts/demo_serve.py out/sentiment-onnx

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_tune.py
	$(BIN)/python benchmarks/bench_edge.py

completions: install
	for shell in bash zsh fish; do _LLMCTL_COMPLETE=source_$$shell $(BIN)/llmctl > completions/llmctl.$$shell; done

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
