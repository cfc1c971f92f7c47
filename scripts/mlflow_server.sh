#!/usr/bin/env bash
# Bring an MLflow tracking server up on the Ray head node and print the URI jobs should use.
#
#   ray exec cluster/aws-gpu.yaml "bash ~/prance/scripts/mlflow_server.sh s3://BUCKET/mlflow"
#   ray exec cluster/gcp-gpu.yaml "bash ~/prance/scripts/mlflow_server.sh gs://BUCKET/mlflow"
#   bash scripts/mlflow_server.sh /mnt/shared/mlflow        # on-prem: a shared folder
#   bash scripts/mlflow_server.sh --stop
#   bash scripts/mlflow_server.sh --dry-run s3://BUCKET/mlflow   # print what it would run
#
# Runs and metrics go to a sqlite database on the head node (~/mlflow/mlflow.db, or
# $MLFLOW_BACKEND_STORE_URI, e.g. a postgresql:// URI); artifacts go to the first argument
# (default ~/mlflow/artifacts on the head node). The server proxies artifacts, so only the head
# node needs bucket credentials. It listens on all interfaces of the head ($MLFLOW_HOST) on port
# $MLFLOW_PORT (5000): workers log to it over the cluster's private network; the cluster's
# firewall keeps the port closed to the internet, and you reach the UI through SSH forwarding.
# Starting it again while it runs only prints the URI. The last line on stdout is the URI.
set -euo pipefail

PYTHON=${PYTHON:-python}
STATE_DIR=${MLFLOW_STATE_DIR:-$HOME/mlflow}
PORT=${MLFLOW_PORT:-5000}
HOST=${MLFLOW_HOST:-0.0.0.0}
WORKERS=${MLFLOW_WORKERS:-2}
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE_DIR/mlflow.db}
PID_FILE=$STATE_DIR/server.pid
LOG_FILE=$STATE_DIR/server.log

say() { echo "mlflow_server: $*" >&2; }
die() { echo "mlflow_server: error: $*" >&2; exit 2; }

dry_run=0
case "${1:-}" in
  --stop)
    if [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
      kill -- "-$(cat "$PID_FILE")" 2>/dev/null || kill "$(cat "$PID_FILE")"
      say "stopped (pid $(cat "$PID_FILE"))"
    else
      say "not running"
    fi
    rm -f "$PID_FILE"
    exit 0 ;;
  --dry-run) dry_run=1; shift ;;
  -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) die "unknown option $1 (use --stop, --dry-run or an artifact location)" ;;
esac
[[ $# -le 1 ]] || die "one artifact location at most, got $#: $*"
ARTIFACTS=${1:-$STATE_DIR/artifacts}
case "$ARTIFACTS" in
  s3://*|gs://*|wasbs://*|hdfs://*|/*) ;;
  *) die "artifact location $ARTIFACTS must be s3://..., gs://..., or an absolute path" ;;
esac
[[ $PORT =~ ^[0-9]+$ ]] || die "MLFLOW_PORT must be a number, got $PORT"

# The address other nodes reach this one at: Ray's own choice of node IP, else the first one.
node_ip() {
  "$PYTHON" - <<'EOF' 2>/dev/null || hostname -I 2>/dev/null | awk '{print $1}'
from ray._private.services import get_node_ip_address
print(get_node_ip_address())
EOF
}
IP=$(node_ip)
[[ -n $IP ]] || die "cannot tell this node's IP address"
URI="http://$IP:$PORT"

healthy() {
  "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2).read()" \
    "http://127.0.0.1:$PORT/health" >/dev/null 2>&1
}

# Host headers the server accepts (MLflow's guard against DNS rebinding): this node's address for
# the workers, localhost on any port for SSH-forwarded browsers.
ALLOWED_HOSTS=${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:*,127.0.0.1,127.0.0.1:*,$IP,$IP:$PORT}

CMD=("$PYTHON" -m mlflow server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
     --host "$HOST" --port "$PORT" --workers "$WORKERS" --allowed-hosts "$ALLOWED_HOSTS")

if (( dry_run )); then
  say "would run: ${CMD[*]}"
  echo "$URI"
  exit 0
fi

if [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null && healthy; then
  say "already running (pid $(cat "$PID_FILE"), log $LOG_FILE)"
  echo "$URI"
  exit 0
fi
if healthy; then
  die "port $PORT already answers MLflow health checks but not from $PID_FILE: stop that server or set MLFLOW_PORT"
fi

"$PYTHON" -c "import mlflow" 2>/dev/null || die "$PYTHON cannot import mlflow (is the project installed? pip install -e ~/prance)"
case "$ARTIFACTS" in
  s3://*) "$PYTHON" -c "import boto3" 2>/dev/null || die "s3:// artifacts need boto3 on this node: pip install boto3" ;;
  gs://*) "$PYTHON" -c "import google.cloud.storage" 2>/dev/null || die "gs:// artifacts need google-cloud-storage on this node: pip install google-cloud-storage" ;;
esac
mkdir -p "$STATE_DIR"
[[ $ARTIFACTS == /* ]] && mkdir -p "$ARTIFACTS"

# setsid: its own process group (so --stop ends the server and its workers), detached from this shell.
setsid nohup "${CMD[@]}" >"$LOG_FILE" 2>&1 < /dev/null &
echo $! > "$PID_FILE"
for _ in $(seq 1 120); do
  if healthy; then
    say "up (pid $(cat "$PID_FILE"), log $LOG_FILE): runs in $BACKEND, artifacts in $ARTIFACTS"
    say "jobs: PRANCE_MLFLOW_URI=$URI in the runtime env (cluster/runtime_env.yaml)"
    say "UI on your machine: ray attach CLUSTER.yaml -p $PORT, then open http://localhost:$PORT"
    echo "$URI"
    exit 0
  fi
  kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { tail -n 20 "$LOG_FILE" >&2; die "the server exited (log above, $LOG_FILE)"; }
  sleep 1
done
tail -n 20 "$LOG_FILE" >&2
die "no answer from http://127.0.0.1:$PORT/health after 120 s (log $LOG_FILE)"
