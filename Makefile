# merflow: `make demo` runs the whole job on the built-in demo corpus; `make test` runs the suite.
# Both set up everything first (system packages where possible, the virtualenv, the project).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-run
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint format bench clean

setup: system-deps $(VENV)/.installed

system-deps:
	@bash .ci/system-deps.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --no-cache-dir -e '.[dev]'
	@touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/merflow demo --out $(DEMO_OUT)

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# The benchmarks that are quick on a CPU, at small sizes (a few minutes on 2 cores); each prints
# its figures. Run by hand, not in CI. The longer ones (benchmarks/extraction.py,
# benchmarks/soak.py, benchmarks/store_load.py, the paper-size benchmarks/train_synthetic.py)
# stay manual: see docs/testing.md.
bench: setup
	@echo "== raw video: audio split and face crops (4 demo clips)"
	$(PY) benchmarks/raw_video.py --n 4 --backends dlib,opencv
	@echo "== extractors: tiny models, CPU"
	$(PY) benchmarks/extractors.py --crops 16 --clips 2 --audio-seconds 5 --texts 8 --repeats 1
	@echo "== store: local disk vs S3 (moto on loopback)"
	$(PY) benchmarks/store_objectstore.py --rows 1000 --shard 100 --dim 256 --shard-ids 32
	@echo "== MR-CCL throughput at paper size, 512 rows, 1 thread"
	$(PY) benchmarks/train_synthetic.py --throughput --rows 512 --threads 1

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
