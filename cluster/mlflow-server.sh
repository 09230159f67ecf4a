#!/usr/bin/env bash
# An MLflow tracking server for a cluster: runs in SQLite (or PostgreSQL), artifacts in S3.
#   ARTIFACTS=s3://my-bucket/mlflow cluster/mlflow-server.sh
# Binds to 127.0.0.1 unless HOST is set (expose it deliberately, behind auth, if at all).
set -euo pipefail
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5001}"
STORE="${BACKEND_STORE_URI:-sqlite:///$(pwd)/mlflow-server.db}"
ARTIFACTS="${ARTIFACTS:?set ARTIFACTS=s3://bucket/prefix}"
exec mlflow server --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" \
    --host "$HOST" --port "$PORT"
