# pkdot — two commands on a fresh clone: `make demo` and `make test` (each runs `setup` first if needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MPLBACKEND := Agg

.PHONY: setup demo test test-fast lint imports bench bench-quality ray-up ray-down clean

# Where torch==2.13.0 comes from. Default: PyTorch's CPU-only index when the machine has no NVIDIA driver
# (no `nvidia-smi`), else PyPI's default build (CUDA). Override, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a CUDA build from PyTorch's index
#   make setup TORCH_INDEX=                                          # pip's own configuration (an offline mirror)
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

# What setup installs: a venv in .venv; torch 2.13.0 (from TORCH_INDEX); then pkdot in editable mode with its
# dependencies (pyproject.toml: numpy, scipy, pandas, pyarrow, pydantic, rich, OpenCV headless, PyAV, librosa,
# scikit-image/-learn, matplotlib, POT, Prefect, Ray[train,default], MLflow) and the dev tools (pytest, ruff,
# mypy, geomloss, moto, boto3).
$(BIN)/pkdot:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev]'

setup: $(BIN)/pkdot

demo: $(BIN)/pkdot
	$(BIN)/pkdot run

test: $(BIN)/pkdot
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --durations=25 tests

test-fast: $(BIN)/pkdot
	$(BIN)/python -m pytest -q -m "not slow and not integration" tests

# The layers contract (pyproject.toml [tool.importlinter], docs/architecture.md); CI runs it before the tests.
imports: $(BIN)/pkdot
	$(BIN)/lint-imports

lint: imports
	$(BIN)/ruff check pkdot flows tests benchmarks
	$(BIN)/ruff format --check pkdot flows tests benchmarks
	$(BIN)/mypy pkdot

bench: $(BIN)/pkdot
	$(BIN)/python benchmarks/speed.py

bench-quality: $(BIN)/pkdot
	$(BIN)/python benchmarks/quality.py

# A Ray head for `pkdot run --ray-address auto`. Every listener (GCS, raylet, dashboard and its agent, runtime-env
# agent, metrics, client server) binds to RAY_NODE_IP = 127.0.0.1, the agents on free ports. Setting RAY_NODE_IP
# to an address of this machine opens Ray to that network with Ray's token authentication on (clients need
# ~/.ray/auth_token): without it anyone who reaches the ports can run code as you.
RAY_NODE_IP ?= 127.0.0.1
RAY_PORT ?= 6379
RAY_CPUS ?= 2
ray-up: $(BIN)/pkdot
	env $$($(BIN)/python -m pkdot.ray_utils head-env $(RAY_NODE_IP)) $(BIN)/ray start --head --port $(RAY_PORT) \
		--num-cpus $(RAY_CPUS) --disable-usage-stats $$($(BIN)/python -m pkdot.ray_utils head-args $(RAY_NODE_IP) --dashboard --gcs-port $(RAY_PORT))
	@echo "Ray head on $(RAY_NODE_IP):$(RAY_PORT) (dashboard URL above); run with: $(BIN)/pkdot run --ray-address auto"

ray-down:
	$(BIN)/ray stop

clean:
	rm -rf runs .pytest_cache
