#!/usr/bin/env bash
# Start / stop the team stack's servers natively on 127.0.0.1 (no Docker): Prefect server, MLflow server
# (SQLite + local artifacts, --serve-artifacts) and a Ray head. State, stores and logs: $PKDOT_STACK_DIR
# (default .local-stack/ in the current directory).
#
#   infra/local-stack.sh start [--free-ports] [--ray-dashboard]   # prints export lines for the clients
#   eval "$(infra/local-stack.sh env)"                            # PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS
#   infra/local-stack.sh status                                   # exit 0 when every server is healthy
#   infra/local-stack.sh stop
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then python="$here/../.venv/bin/python"; else python="$(command -v python3)"; fi
fi
exec "$python" "$here/local_stack.py" "$@"
