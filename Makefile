# Everything installs from nothing: `make test` and `make demo` on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; any other spec may pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test data browser demo serve reproduce ship bench clean pin

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	$(PY) -m pip install -q -e ".[test,demo,quant]"
	touch $@

# Fashion-MNIST's default place is named once, in ctfgen.data.fashion_mnist.DEFAULT_DIR.
data: install
	@$(PY) -c "from ctfgen.data.fashion_mnist import find_fashion_mnist; find_fashion_mnist()" 2>/dev/null || { \
		echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# The demo's browser test drives Debian's Chromium through Playwright; without it that test skips.
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing Chromium for the demo's browser test (Debian package chromium)"; \
		(apt-get update -qq && apt-get install -y -qq chromium) || echo "could not install chromium: the browser test will skip"; \
	fi

test: install data browser
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

demo: install
	$(VENV)/bin/ctfgen sample --class sneaker --n 16 --out samples.png

# The web demo on http://127.0.0.1:7860 (SERVE_ARGS="--host 0.0.0.0 --port 8080" to change).
serve: install
	$(VENV)/bin/ctfgen demo $(SERVE_ARGS)

reproduce: install data
	$(VENV)/bin/ctfgen pipeline configs/fashion_mnist.yaml --out runs/fashion_mnist --resume
	$(VENV)/bin/ctfgen reproduce configs/fashion_mnist_ablations.yaml --run runs/fashion_mnist

# Replace the shipped models (src/ctfgen/assets/fashion_mnist) with a finished run's (SHIP_RUN).
# WEIGHTS_DTYPE=bfloat16 (or float16) stores the models' parameters in 16 bits; they load as float32.
# SHIP_ARGS="--sampling-from RECORDS" ships the sampling setting `ctfgen study` chose for that run.
SHIP_RUN ?= runs/fashion_mnist
WEIGHTS_DTYPE ?= float32
ship: install
	$(PY) -m ctfgen.shipped $(SHIP_RUN) --weights-dtype $(WEIGHTS_DTYPE) $(SHIP_ARGS)

bench: install
	$(VENV)/bin/ctfgen bench --models fashion-mnist GPT-B --batch-sizes 1 8 64

# A pinned install for long experiments: one commit, non-editable, in its own venv outside the
# checkout, so code changed meanwhile never reaches a running experiment and every record names
# the commit (ctfgen.utils.fingerprint.code_commit reads the stamp written here).
#   make pin [COMMIT=HEAD] [PIN_DIR=~/pinned]   ->   ~/pinned/<sha>/venv/bin/ctfgen
COMMIT ?= HEAD
PIN_DIR ?= $(HOME)/pinned
pin:
	@sha=$$(git rev-parse --verify "$(COMMIT)^{commit}") && dir="$(PIN_DIR)/$$sha" && \
	rm -rf "$$dir/src" && mkdir -p "$$dir/src" && git archive "$$sha" | tar -x -C "$$dir/src" && \
	echo "$$sha" > "$$dir/src/src/ctfgen/COMMIT" && \
	$(PYTHON) -m venv "$$dir/venv" && "$$dir/venv/bin/pip" install -q --upgrade pip && \
	"$$dir/venv/bin/pip" install -q "$(TORCH_SPEC)" && \
	"$$dir/venv/bin/pip" install -q --no-deps "torch-fidelity==0.4.0" && \
	"$$dir/venv/bin/pip" install -q "$$dir/src" && rm -rf "$$dir/src" && \
	echo "pinned $$sha: $$dir/venv/bin/ctfgen ($$("$$dir/venv/bin/python" -c 'from ctfgen.utils.fingerprint import code_commit; print(code_commit())'))"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
