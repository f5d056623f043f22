# Convergence: `make run` starts the service on the embedded store, `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BUF_VERSION := 1.75.0
BUF := build/tools/node_modules/.bin/buf
PROTOS := $(wildcard protos/convergence/v1/*.proto)
GEN_DIR := clients/python
GEN_STAMP := build/.proto-stamp
DESCRIPTOR := build/convergence.pb
# The BigQuery emulator the tests start (Python 3.13, its own virtualenv; no network at run time).
EMULATOR_PYTHON ?= $(shell for p in $$HOME/.pyenv/versions/3.13*/bin/python3.13 $$(command -v python3.13); do $$p -V >/dev/null 2>&1 && { echo $$p; break; }; done)
EMULATOR_DIR := build/bigquery-emulator
EMULATOR_REQUIREMENTS := tests/fixtures/bigquery-emulator.txt

.DEFAULT_GOAL := help
.PHONY: help install proto lint breaking test run bench soak clean

help: ## Show this help.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e clients/python -e '.[dev]'
	touch $@

$(EMULATOR_DIR)/.installed: $(EMULATOR_REQUIREMENTS)
	@test -n "$(EMULATOR_PYTHON)" || { echo "Python 3.13 is needed for the BigQuery emulator (set EMULATOR_PYTHON)"; exit 1; }
	rm -rf $(EMULATOR_DIR) && mkdir -p $(EMULATOR_DIR)/home
	$(EMULATOR_PYTHON) -m venv $(EMULATOR_DIR)/venv
	$(EMULATOR_DIR)/venv/bin/pip install --quiet --disable-pip-version-check -r $(EMULATOR_REQUIREMENTS)
	# DuckDB reads its extensions from $$HOME/.duckdb: install them there, from the wheels.
	HOME=$(abspath $(EMULATOR_DIR)/home) $(EMULATOR_DIR)/venv/bin/python -c \
	  "from duckdb_extensions import import_extension as i; [i(n) for n in ('ducklake', 'icu', 'spatial')]"
	touch $@

install: $(VENV)/.installed $(EMULATOR_DIR)/.installed ## Create the virtualenvs: server, client, dev tools, BigQuery emulator.

# The OpenAPI document also takes the transcoded services from Envoy's template and the
# methods that need no key from the interceptors.
$(GEN_STAMP): $(PROTOS) $(VENV)/.installed server/convergence_server/openapi.py \
  envoy/envoy.yaml.tmpl server/convergence_server/api/interceptors.py
	@mkdir -p build
	rm -f $(GEN_DIR)/convergence/v1/*_pb2*.py $(GEN_DIR)/convergence/v1/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) \
	  --python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  $(PROTOS)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) --include_imports --include_source_info \
	  --descriptor_set_out=$(DESCRIPTOR) \
	  $(PROTOS) google/rpc/status.proto google/rpc/error_details.proto
	$(PY) -m convergence_server.openapi $(DESCRIPTOR) $(GEN_DIR)/convergence/openapi.json
	touch $@

proto: $(GEN_STAMP) ## Generate the Python modules, .pyi stubs, Envoy's descriptor set and the OpenAPI document from protos/.

$(BUF):
	npm install --silent --no-save --prefix build/tools @bufbuild/buf@$(BUF_VERSION)

# The googleapis protos ours import, as a buf module (buf's registry is not used).
THIRD_PARTY := build/third_party/.copied
$(THIRD_PARTY): $(VENV)/.installed
	mkdir -p build/third_party/google/api build/third_party/google/rpc
	cp $(SITE)/google/api/annotations.proto $(SITE)/google/api/http.proto $(SITE)/google/api/field_behavior.proto build/third_party/google/api/
	cp $(SITE)/google/rpc/status.proto $(SITE)/google/rpc/error_details.proto $(SITE)/google/rpc/code.proto build/third_party/google/rpc/
	touch $@

lint: $(GEN_STAMP) $(BUF) $(THIRD_PARTY) ## Lint the protos (buf), the Python code (ruff) and its types (mypy --strict).
	$(BUF) lint
	$(VENV)/bin/ruff check server tests bench clients
	$(VENV)/bin/ruff format --check server tests bench clients
	$(VENV)/bin/mypy

# What the protos must stay compatible with: a git branch, tag or commit (`AGAINST=v1.0.0`).
AGAINST ?= $(shell git rev-parse -q --verify main >/dev/null && echo main || echo origin/main)
AGAINST_DIR := build/against

breaking: $(BUF) $(VENV)/.installed ## Refuse proto changes that break integrators (buf breaking against AGAINST: main).
	rm -rf $(AGAINST_DIR) && mkdir -p $(AGAINST_DIR)
	git archive --format=tar $(AGAINST) protos | tar -x -C $(AGAINST_DIR)
	# Both sides as images built by protoc (the googleapis imports come from the virtualenv).
	$(PY) -m grpc_tools.protoc -I$(AGAINST_DIR)/protos -I$(SITE) --include_imports \
	  --descriptor_set_out=$(AGAINST_DIR)/against.binpb \
	  $$(cd $(AGAINST_DIR)/protos && ls convergence/v1/*.proto)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(SITE) --include_imports --include_source_info \
	  --descriptor_set_out=$(AGAINST_DIR)/current.binpb $(PROTOS)
	$(BUF) breaking $(AGAINST_DIR)/current.binpb --against $(AGAINST_DIR)/against.binpb

test: $(GEN_STAMP) $(EMULATOR_DIR)/.installed $(BUF) ## Run the test suite (starts real servers and Envoy on loopback ports).
	$(PY) -m pytest -n 2 --dist loadfile --durations=15

run: $(GEN_STAMP) ## Start the gRPC server and Envoy on the embedded store; Ctrl-C stops both.
	$(PY) -m convergence_server stack

bench: $(GEN_STAMP) $(EMULATOR_DIR)/.installed ## Run the benchmarks and print their results.
	$(PY) -m bench.api_overhead
	$(PY) -m bench.pipelines
	$(PY) -m bench.interceptors
	$(PY) -m bench.stores
	$(PY) -m bench.api_jobs
	$(PY) -m bench.noisy
	$(PY) -m bench.scheduler
	$(PY) -m bench.observability
	$(PY) -m bench.h2load_calls
	$(PY) -m bench.h2load_calls --triggers --concurrency 16

soak: $(GEN_STAMP) ## Run the 30-minute memory soak (steady mixed load; server and Envoy RSS).
	$(PY) -m bench.soak --minutes 30

clean: ## Remove the virtualenv, generated code and build output (keeps .data/).
	rm -rf $(VENV) build $(GEN_DIR)/convergence/v1/*_pb2*.py $(GEN_DIR)/convergence/v1/*_pb2*.pyi
	rm -f $(GEN_DIR)/convergence/openapi.json
