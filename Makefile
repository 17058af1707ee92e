# The two set-up commands of the README: `make demo` (install + run the main job on the sample graph)
# and `make test` (install + run the tests). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where no GPU exists, take a CPU build of torch: this pin resolves to the CPU wheel of the machines we
# run on; elsewhere pass TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_WS ?= .kalmkg-demo

.PHONY: install browser demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml kalmkg/llamacpp/build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(BIN)/pip install "torch>=2.3"; \
	else \
		echo "no GPU: installing a CPU build of torch"; \
		$(BIN)/pip install "$(TORCH_CPU)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
	@# llama.cpp compiled for the instructions this machine really runs (+ CUDA with a GPU and nvcc), the wheel
	@# cached in ~/.cache/kalmkg/llama-cpp by source and flags; then kalmkg, which finds it installed
	$(BIN)/python -m kalmkg.llamacpp.build
	$(BIN)/pip install -e '.[train,test,quantize]'
	touch $@

demo: install
	rm -rf $(DEMO_WS)
	$(BIN)/kalmkg -w $(DEMO_WS) ingest sample_graphs/world.ttl
	$(BIN)/kalmkg -w $(DEMO_WS) stats --top 5
	$(BIN)/kalmkg -w $(DEMO_WS) entities "Marie Cury"
	$(BIN)/kalmkg -w $(DEMO_WS) split --valid 0.1 --test 0.1 --seed 0
	$(BIN)/kalmkg -w $(DEMO_WS) train --max-steps 40 --eval-every 20 --eval-limit 30 --run-name demo
	$(BIN)/kalmkg -w $(DEMO_WS) predict Paris capital_of '?' -k 5
	$(BIN)/kalmkg -w $(DEMO_WS) predict '?' founded_by "Bill Gates" -k 5
	$(BIN)/kalmkg -w $(DEMO_WS) export --quant Q8_0
	$(BIN)/kalmkg -w $(DEMO_WS) predict Paris capital_of '?' -k 5 --backend gguf
	$(BIN)/kalmkg -w $(DEMO_WS) ask "What is the nationality of Marie Curie's spouse?"
	$(BIN)/kalmkg -w $(DEMO_WS) ask "Who founded Apple?" --hops 1 --max-facts 4
	$(BIN)/kalmkg -w $(DEMO_WS) ask "What money do people use in India?"
	$(BIN)/kalmkg -w $(DEMO_WS) ask "Who won the 1998 FIFA World Cup?"
	$(BIN)/kalmkg -w $(DEMO_WS) ask "Who is the spouse of Angela Merkel?" --min-precision 0.9

# Debian's Chromium and its driver, for the test of `kalmkg serve`'s web page (skipped where they cannot be
# installed: not Debian, or not root)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (apt) for the web page's browser test"; \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null); \
	else echo "no chromium: the web page's browser test will be skipped"; fi

test: install browser
	$(BIN)/ruff check kalmkg tests bench
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) $(DEMO_WS) .pytest_cache bench/_work
