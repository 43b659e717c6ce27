# Everything a fresh machine needs, from nothing: a local virtual environment with
# torch pinned first (an unpinned torch pulls a multi-GB CUDA build), then weightsmith.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# transformers 4.x (its last release) beside the main environment, put first on PYTHONPATH by the
# conformance tests that load weightsmith's files with it; its other needs come from the main one
TF4    := .venv-tf4
TF4_PKGS := "transformers==4.57.*" "tokenizers>=0.22,<0.23" "huggingface_hub>=0.34,<1.0" \
            requests urllib3 certifi idna charset-normalizer

.PHONY: demo test tf4 bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

# the demo needs only the package and its report extra (plotly), not the test dependencies
$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[report]"
	touch $@

demo: $(VENV)/.demo
	$(BIN)/weightsmith demo

test: $(VENV)/.installed $(TF4)/.installed
	$(BIN)/python -m pytest

tf4: $(TF4)/.installed

$(TF4)/.installed: $(VENV)/.installed
	rm -rf $(TF4)
	$(BIN)/pip install --quiet --no-deps --target $(TF4) $(TF4_PKGS)
	PYTHONPATH=$(TF4) $(BIN)/python -c "import transformers as t; assert t.__version__.startswith('4.'), t.__version__"
	touch $@

bench: $(VENV)/.installed
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) $(TF4) demo-output
