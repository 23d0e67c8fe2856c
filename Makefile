# Atoll: `make demo` sets everything up and runs the main job; `make test` runs the whole suite.
SHELL := /bin/bash
CARGO ?= cargo
WITH_LIBTORCH := scripts/with-libtorch.sh
ATOLL := target/release/atoll
REFERENCE_VENV ?= $(HOME)/.cache/atoll/reference-venv
S3_VENV ?= $(HOME)/.cache/atoll/s3-venv

.PHONY: demo test build setup lint fmt fixtures s3-server reference bench-train-step bench-codecs bench-link bench-wan-calibration bench-diloco bench-checkpoint bench-drafter check-transformers clean-runs help

help:
	@echo "make demo    install what is missing, build, run a 4-region Decoupled DiLoCo job on this machine (a few minutes)"
	@echo "make test    format + lint checks and the whole test suite"
	@echo "make build   build $(ATOLL)"
	@echo "make bench-codecs | bench-link | bench-wan-calibration | bench-diloco | bench-checkpoint    benchmarks (see benchmarks/README.md)"
	@echo "make fixtures | bench-train-step | check-transformers   (need the Python reference stack)"

setup:
	@command -v $(CARGO) >/dev/null || { echo "Rust (cargo) is required: https://rustup.rs"; exit 1; }
	@command -v cc >/dev/null || { echo "a C compiler is required (apt-get install build-essential)"; exit 1; }
	@$(WITH_LIBTORCH) true

build: setup
	$(WITH_LIBTORCH) $(CARGO) build --release --locked -p atoll-cli
	@echo "built $(ATOLL)"

demo: build
	$(ATOLL) run recipes/four-regions.yaml

lint: setup
	$(CARGO) fmt --all -- --check
	$(WITH_LIBTORCH) $(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

# The S3-protocol server (moto) the checkpoint tests run against, outside the clone.
$(S3_VENV)/.installed: scripts/requirements-s3.txt
	python3 -m venv $(S3_VENV)
	$(S3_VENV)/bin/pip install --quiet -r scripts/requirements-s3.txt
	touch $@

s3-server: $(S3_VENV)/.installed

reference: $(REFERENCE_VENV)/.installed

test: build lint s3-server reference
	ATOLL_BIN=$(CURDIR)/$(ATOLL) ATOLL_MOTO_SERVER=$(S3_VENV)/bin/moto_server ATOLL_REFERENCE_PYTHON=$(REFERENCE_VENV)/bin/python $(WITH_LIBTORCH) $(CARGO) test --release --locked --workspace

fmt:
	$(CARGO) fmt --all

# --- Python reference stack (transformers/torch pinned in scripts/requirements-reference.txt) ---
$(REFERENCE_VENV)/.installed: scripts/requirements-reference.txt
	python3 -m venv $(REFERENCE_VENV)
	$(REFERENCE_VENV)/bin/pip install --quiet -r scripts/requirements-reference.txt
	touch $@

fixtures: $(REFERENCE_VENV)/.installed
	$(REFERENCE_VENV)/bin/python scripts/make_fixtures.py tests/fixtures
	$(REFERENCE_VENV)/bin/python scripts/make_drafter_fixtures.py tests/fixtures

bench-train-step: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python benchmarks/train_step.sh

bench-codecs: build
	$(ATOLL) bench codecs

bench-link: build
	$(ATOLL) bench link

bench-wan-calibration: build
	benchmarks/wan_calibration.sh

bench-diloco: build
	benchmarks/diloco_headline.sh

bench-checkpoint: build s3-server
	MOTO_SERVER=$(S3_VENV)/bin/moto_server benchmarks/checkpoint_stall.sh

bench-drafter: build
	benchmarks/drafter.sh

check-transformers: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python scripts/check_transformers_roundtrip.sh

clean-runs:
	rm -rf runs
