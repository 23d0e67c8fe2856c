# Atoll: `make demo` sets everything up and runs the main job; `make test` runs the whole suite.
SHELL := /bin/bash
CARGO ?= cargo
WITH_LIBTORCH := scripts/with-libtorch.sh
ATOLL := target/release/atoll
REFERENCE_VENV ?= $(HOME)/.cache/atoll/reference-venv
S3_VENV ?= $(HOME)/.cache/atoll/s3-venv
K8S_VENV ?= $(HOME)/.cache/atoll/k8s-venv

.PHONY: demo test build setup lint fmt fixtures s3-server reference k8s-validate bench-train-step bench-codecs bench-merge bench-link bench-wan-calibration bench-diloco bench-diloco-robust bench-checkpoint bench-export bench-gguf check-transformers bench-drafter clean-runs help finetune-demo bench-lora lora-fixtures

help:
	@echo "make demo    install what is missing, build, run a 4-region Decoupled DiLoCo job on this machine (a few minutes)"
	@echo "make test    format + lint checks and the whole test suite"
	@echo "make build   build $(ATOLL)"
	@echo "make bench-codecs | bench-merge | bench-link | bench-wan-calibration | bench-diloco | bench-checkpoint    benchmarks (see benchmarks/README.md)"
	@echo "make fixtures | bench-train-step | check-transformers   (need the Python reference stack)"
	@echo "make finetune-demo | bench-lora | lora-fixtures   LoRA fine-tuning demo, LoRA step vs peft, PEFT fixtures (docs/finetune.md)"
	@echo "make bench-diloco-robust | bench-export | bench-gguf | bench-drafter   more benchmarks (bench-gguf builds llama-cpp-python)"
	@echo "make lint | fmt | clean-runs   format and clippy checks only, cargo fmt, remove runs/"

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

# kubernetes-validate, which checks the objects `atoll deploy k8s` renders, outside the clone.
$(K8S_VENV)/.installed: scripts/requirements-k8s.txt
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install --quiet -r scripts/requirements-k8s.txt
	touch $@

k8s-validate: $(K8S_VENV)/.installed

reference: $(REFERENCE_VENV)/.installed

test: build lint s3-server reference k8s-validate
	ATOLL_BIN=$(CURDIR)/$(ATOLL) ATOLL_MOTO_SERVER=$(S3_VENV)/bin/moto_server ATOLL_REFERENCE_PYTHON=$(REFERENCE_VENV)/bin/python ATOLL_K8S_VALIDATE=$(K8S_VENV)/bin/kubernetes-validate $(WITH_LIBTORCH) $(CARGO) test --release --locked --workspace

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
	$(REFERENCE_VENV)/bin/python scripts/make_drafter_gguf_fixture.py

lora-fixtures: $(REFERENCE_VENV)/.installed
	$(REFERENCE_VENV)/bin/python scripts/make_lora_fixtures.py tests/fixtures

# LoRA fine-tuning demo: pretrain the tiny base briefly, then fine-tune it on the shipped
# Shakespeare instruction set (data/shakespeare-instruct.jsonl); held-out loss falls.
finetune-demo: build
	rm -rf runs/finetune-demo-base runs/lora-tiny
	$(ATOLL) train recipes/tiny-shakespeare.yaml --set run.dir=runs/finetune-demo-base --set train.max_steps=300 --set train.eval_every=100
	$(ATOLL) finetune recipes/lora-tiny.yaml --merge

bench-lora: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python benchmarks/lora_step.sh

bench-train-step: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python benchmarks/train_step.sh

bench-codecs: build
	benchmarks/codecs.sh

bench-merge: build
	$(ATOLL) bench merge

bench-link: build
	$(ATOLL) bench link

bench-wan-calibration: build
	benchmarks/wan_calibration.sh

bench-diloco: build
	benchmarks/diloco_headline.sh

bench-checkpoint: build s3-server
	MOTO_SERVER=$(S3_VENV)/bin/moto_server benchmarks/checkpoint_stall.sh

LLAMA_VENV ?= $(HOME)/.cache/atoll/llama-venv

# llama-cpp-python compiles llama.cpp from source (cmake, C++): long on a small machine.
LLAMA_CPP_PYTHON = 0.3.36
# The stamp names the version, so a venv built with another one is rebuilt.
$(LLAMA_VENV)/.installed-$(LLAMA_CPP_PYTHON):
	python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet llama-cpp-python==$(LLAMA_CPP_PYTHON) safetensors numpy
	touch $@

bench-export: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python benchmarks/export_gguf.sh

bench-gguf: build $(REFERENCE_VENV)/.installed $(LLAMA_VENV)/.installed-$(LLAMA_CPP_PYTHON)
	LLAMA_PYTHON=$(LLAMA_VENV)/bin/python benchmarks/gguf_llama_cpp.sh
	PYTHON=$(REFERENCE_VENV)/bin/python LLAMA_PYTHON=$(LLAMA_VENV)/bin/python benchmarks/gguf_attention_scale.sh

bench-diloco-robust: build
	benchmarks/diloco_robust.sh

bench-drafter: build
	benchmarks/drafter.sh

check-transformers: build $(REFERENCE_VENV)/.installed
	PYTHON=$(REFERENCE_VENV)/bin/python scripts/check_transformers_roundtrip.sh

clean-runs:
	rm -rf runs
