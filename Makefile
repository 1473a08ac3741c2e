# Two commands: `make pipeline` (set up + run the pipeline, small profile) and `make test`.
# Offline, point NBLIB_MIRROR at a data folder laid out like shared/data (it defaults to
# ../shared/data when that folder exists).
VENV ?= .venv
PROFILE ?= smoke
PY := $(VENV)/bin/python
NBLIB_MIRROR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export NBLIB_MIRROR

.PHONY: setup pipeline test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $@

pipeline: setup
	$(PY) -m nblib.pipeline --profile $(PROFILE)

test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_pretrain.py

clean-venv:
	rm -rf $(VENV)
