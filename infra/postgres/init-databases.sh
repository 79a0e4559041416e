#!/bin/sh
# Creates the Prefect and the MLflow database on the first start of the postgres container
# (mounted into /docker-entrypoint-initdb.d/ by docker-compose.yml). Idempotent: an existing database is kept.
# Inputs (environment): POSTGRES_USER, PREFECT_DB, MLFLOW_DB, MLFLOW_AUTH_DB (MLflow's users; optional).
set -eu
: "${POSTGRES_USER:?POSTGRES_USER is not set}"
: "${PREFECT_DB:?PREFECT_DB is not set}"
: "${MLFLOW_DB:?MLFLOW_DB is not set}"
if [ "$PREFECT_DB" = "$MLFLOW_DB" ]; then
    echo "init-databases: PREFECT_DB and MLFLOW_DB must differ (both are '$PREFECT_DB')" >&2
    exit 1
fi
for db in "$PREFECT_DB" "$MLFLOW_DB" ${MLFLOW_AUTH_DB:+"$MLFLOW_AUTH_DB"}; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres ${PGHOST:+--host "$PGHOST"} \
        ${PGPORT:+--port "$PGPORT"} -v db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I', :'db') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
    echo "init-databases: database '$db' ready"
done
