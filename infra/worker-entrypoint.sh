#!/bin/sh
# Entry point of the compose service prefect-worker (infra/Dockerfile image, working directory /app):
#   1. join the Ray cluster as a node with no CPUs, so flow runs are Ray drivers (RAY_ADDRESS=auto);
#   2. create (or update) the process work pool and deploy pkdot/full-pipeline from prefect.yaml;
#   3. poll the pool; each flow run is a subprocess of this worker.
# Every step must succeed: `set -e` stops the container (and compose restarts it) on the first failure.
set -eu
: "${PREFECT_API_URL:?PREFECT_API_URL is not set}"
: "${RAY_HEAD_ADDRESS:?RAY_HEAD_ADDRESS is not set (host:port of the Ray head)}"
POOL=pkdot-pool  # the work pool named in prefect.yaml
cd /app

ray start --address "$RAY_HEAD_ADDRESS" --num-cpus 0 --disable-usage-stats
prefect work-pool create "$POOL" --type process --overwrite
prefect --no-prompt deploy --all
exec prefect worker start --pool "$POOL" --type process --with-healthcheck
