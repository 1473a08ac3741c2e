# Two commands: `make pipeline` (set up + run the pipeline, small profile) and `make test`.
# Offline, point NBLIB_MIRROR at a data folder laid out like shared/data (it defaults to
# ../shared/data when that folder exists).
VENV ?= .venv
PROFILE ?= smoke
PY := $(VENV)/bin/python
NBLIB_MIRROR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export NBLIB_MIRROR

.PHONY: setup pipeline test bench bench-inference kaggle-stack clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-ci.txt pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $@

pipeline: setup
	$(PY) -m nblib.pipeline --profile $(PROFILE)

test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_pretrain.py

# Decode cost of MHA/GQA/MQA; pass options with BENCH_ARGS, e.g. BENCH_ARGS="--shape gpt2-small --batches 1,8"
bench-inference: setup
	$(PY) benchmarks/bench_inference.py $(BENCH_ARGS)

# The README's Kaggle set-up on a stand-in of Kaggle's image, then four smoke stages there (minutes)
kaggle-stack: setup
	$(PY) tools/kaggle_stack.py

clean-venv:
	rm -rf $(VENV)
