#!/bin/sh
# Entry point of the compose service prefect-worker (infra/Dockerfile image, working directory /app):
#   1. join the Ray cluster as a node with no CPUs, so flow runs are Ray drivers (RAY_ADDRESS=auto);
#   2. create the process work pool if it does not exist, and deploy pkdot/full-pipeline from prefect.yaml only
#      when the deployment does not exist yet or prefect.yaml changed since the last deploy (its SHA-256 is kept
#      on the shared `runs` volume), so edits made in the Prefect UI survive a restart of this container;
#   3. poll the pool; each flow run is a subprocess of this worker.
# Every step must succeed: `set -e` stops the container (and compose restarts it) on the first failure.
set -eu
: "${PREFECT_API_URL:?PREFECT_API_URL is not set}"
: "${RAY_HEAD_ADDRESS:?RAY_HEAD_ADDRESS is not set (host:port of the Ray head)}"
POOL=pkdot-pool  # the work pool named in prefect.yaml
DEPLOYMENT=pkdot/full-pipeline
STAMP=${PKDOT_DEPLOY_STAMP:-/app/runs/.prefect-yaml.sha256}
cd "${PKDOT_APP_DIR:-/app}"

ray start --address "$RAY_HEAD_ADDRESS" --num-cpus 0 --disable-usage-stats
if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
    prefect work-pool create "$POOL" --type process
fi
wanted=$(sha256sum prefect.yaml | cut -d' ' -f1)
deployed=$(cat "$STAMP" 2>/dev/null || true)
if ! prefect deployment inspect "$DEPLOYMENT" >/dev/null 2>&1 || [ "$wanted" != "$deployed" ]; then
    echo "deploying $DEPLOYMENT (prefect.yaml $wanted; last deployed: ${deployed:-never})"
    prefect --no-prompt deploy --all
    printf '%s\n' "$wanted" > "$STAMP"
else
    echo "$DEPLOYMENT is deployed from this prefect.yaml already; not redeploying (UI edits are kept)"
fi
exec prefect worker start --pool "$POOL" --type process --with-healthcheck
