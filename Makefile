# `make demo` and `make test` each work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test install clean bench-accuracy bench-speed bench-cost bench-zoo bench-hf bench-minilm bench-scale bench-decode

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(PY) examples/deit.py

test: $(STAMP)
	$(PY) -m pytest tests

# Benchmarks (not tests): each prints a table, writes benchmarks/results/*.json, and takes minutes.
bench-accuracy: $(BENCH_STAMP)
	$(PY) benchmarks/accuracy.py --markdown

bench-speed: $(BENCH_STAMP)
	$(PY) benchmarks/speed.py --markdown

bench-cost: $(BENCH_STAMP)
	$(PY) benchmarks/cost.py --markdown

bench-zoo: $(BENCH_STAMP)
	$(PY) benchmarks/zoo.py --markdown

bench-hf: $(BENCH_STAMP)
	$(PY) benchmarks/hf.py --markdown

bench-minilm: $(BENCH_STAMP)
	$(PY) benchmarks/minilm.py --markdown

bench-scale: $(BENCH_STAMP)
	$(PY) benchmarks/llama_scale.py --markdown

bench-decode: $(BENCH_STAMP)
	$(PY) benchmarks/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
