# ppap-pipe: `make features mine train eval` runs the pipeline (default: embedded demo data);
# `make test` runs the test suite. Both create .venv and install the project on first use.
#   make features mine train eval PRESET=camvid            # CamVid from ../shared/camvid
#   make mine PRESET=camvid MINE_ARGS="--phi0 0.9 --psi0 0.6 --plans 2 --name ppap_b"
#   make eval PRESET=camvid EVAL_ARGS="--crf-workers 2 --checkpoint last"
#   make predict PRESET=camvid IMAGES=my_photos MASKS=my_masks
PYTHON   ?= python3
VENV     ?= .venv
PRESET   ?= demo
RUN      ?= data_cache/$(PRESET)
DATA     ?=
WORKERS  ?= 0
DEVICE   ?= cpu
FEATURES_ARGS ?=
MINE_ARGS  ?=
TRAIN_ARGS ?=
EVAL_ARGS  ?=
AUDIT_ARGS ?=
SWEEP_ARGS ?= --grid tau=0.1,0.2 --grid lr=3e-5,1e-4
IMAGES   ?=
MASKS    ?= $(RUN)/predict
PREDICT_ARGS ?=

PPAP := $(VENV)/bin/ppap-pipe
STAMP := $(VENV)/.installed
COMMON := --preset $(PRESET) --out $(RUN)

.PHONY: help install features mine train eval predict baseline audit sweep test test-all bench clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)  ## create .venv and install ppap-pipe with test extras

features: $(STAMP)  ## stage 1: cache frozen backbone tokens (PRESET=, DATA=, WORKERS=, DEVICE=)
	$(PPAP) features $(COMMON) $(if $(DATA),--data-root $(DATA)) --workers $(WORKERS) --device $(DEVICE) $(FEATURES_ARGS)

mine: features  ## stage 2: mine PPAP sets into shards (MINE_ARGS= for overrides)
	$(PPAP) mine $(COMMON) --workers $(WORKERS) --device $(DEVICE) $(MINE_ARGS)

train: mine  ## stage 3: train the last-block copy + head (TRAIN_ARGS=)
	$(PPAP) train $(COMMON) --device $(DEVICE) $(TRAIN_ARGS)

eval: train  ## stage 4: frozen baseline, then the run's best.pt (EVAL_ARGS=, e.g. --checkpoint last)
	$(PPAP) eval $(COMMON) --baseline frozen --device $(DEVICE) $(EVAL_ARGS)
	$(PPAP) eval $(COMMON) --device $(DEVICE) $(EVAL_ARGS)

predict: $(STAMP)  ## segment a folder of images with the trained run (IMAGES=dir, MASKS=dir, PREDICT_ARGS=)
	@test -n "$(IMAGES)" || { echo "give IMAGES=<folder of images>, e.g. make predict IMAGES=my_photos"; exit 2; }
	$(PPAP) predict --preset $(PRESET) --run-dir $(RUN) --images $(IMAGES) --out $(MASKS) --device $(DEVICE) $(PREDICT_ARGS)

sweep: mine  ## sweep-train on held-out training images (SWEEP_ARGS="--grid NAME=V1,V2 ...")
	$(PPAP) sweep-train $(COMMON) --device $(DEVICE) $(SWEEP_ARGS)

audit: mine  ## precision audit of the mined sets (AUDIT_ARGS=)
	$(PPAP) audit $(COMMON) $(AUDIT_ARGS)

test: $(STAMP)  ## fast test suite (what CI runs)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)  ## every test, slow ones included
	$(VENV)/bin/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)  ## print the benchmark figures
	for b in benchmarks/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done

clean:  ## remove generated runs under data_cache/ (keeps .venv)
	find data_cache -mindepth 1 -maxdepth 1 ! -name README.md ! -name .gitkeep -exec rm -rf {} +
