#!/usr/bin/env bash
# A team tracking server: `mlflow server` on PostgreSQL, artifacts in a local folder, bound to 127.0.0.1.
#
#   bash scripts/server.sh [--dir .realign-server] [--port 5000] [--pg-port 5433]
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000    # then realign ... / realign pipeline --executor ray
#
# The first call creates a PostgreSQL cluster in <dir>/postgres (as root: in the postgres user's home, named in
# <dir>/postgres-location) with a role `realign` (its password generated into
# <dir>/postgres-password, mode 600) and a database `mlflow`; later calls start the same cluster. The server runs
# in the foreground; Ctrl-C (or SIGTERM) stops it and PostgreSQL. Needs Debian's postgresql (apt-get install
# postgresql) and psycopg2 (pip install 'realign[server]'). Run as root, the database runs as the `postgres` user.
# The production form (basic auth, TLS in front, S3/MinIO artifacts) is in docs/operations.md.
set -euo pipefail
dir=.realign-server port=5000 pg_port=5433
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --pg-port) pg_port=$2; shift 2 ;;
    *) echo "error: unknown option $1 (use --dir, --port, --pg-port)" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")/.." && pwd)
mlflow=${MLFLOW:-$here/.venv/bin/mlflow}
[ -x "$mlflow" ] || mlflow=$(command -v mlflow || true)
[ -n "$mlflow" ] || { echo "error: mlflow is not installed: run bash scripts/setup.sh first" >&2; exit 2; }
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || bin=$(dirname "$(command -v initdb 2>/dev/null || echo /missing/initdb)")
[ -x "$bin/initdb" ] || { echo "error: PostgreSQL is not installed: apt-get install postgresql" >&2; exit 2; }
py=$(dirname "$mlflow")/python
if [ -x "$py" ] && ! "$py" -c "import psycopg2" 2>/dev/null; then
  echo "error: psycopg2 is missing: pip install 'realign[server]'" >&2; exit 2
fi

mkdir -p "$dir" && dir=$(cd "$dir" && pwd)
data=$dir/postgres socket=$dir/socket password_file=$dir/postgres-password
as_db=()
if [ "$(id -u)" = 0 ]; then
  # PostgreSQL refuses to run as root: its commands run as the postgres user, in a folder of that user's home
  # (it cannot be trusted to reach <dir>: /tmp/pytest-of-root and home folders are closed to other users).
  id postgres >/dev/null 2>&1 || { echo "error: run as root, this needs the postgres user (apt-get install postgresql)" >&2; exit 2; }
  as_db=(runuser -u postgres --)
  home=$(getent passwd postgres | cut -d: -f6)
  data=$home/realign-$(printf %s "$dir" | sha1sum | cut -c1-12) socket=$data-socket
  echo "$data" > "$dir/postgres-location"
fi
mkdir -p "$socket" "$dir/artifacts"
if [ ! -s "$data/PG_VERSION" ]; then
  umask 077
  [ -s "$password_file" ] || python3 -c "import secrets; print(secrets.token_urlsafe(24))" > "$password_file"
  mkdir -p "$data"
  pwfile=$password_file
  if [ ${#as_db[@]} -gt 0 ]; then
    chown postgres "$data" "$socket"
    pwfile=$data-initdb-password && cp "$password_file" "$pwfile" && chown postgres "$pwfile"
  fi
  "${as_db[@]}" "$bin/initdb" -D "$data" -U realign --pwfile="$pwfile" --auth-local=scram-sha-256 \
    --auth-host=scram-sha-256 >/dev/null
  [ "$pwfile" = "$password_file" ] || rm -f "$pwfile"
  umask 022
fi
[ ${#as_db[@]} -eq 0 ] || chown postgres "$socket"
password=$(cat "$password_file")
pg_log=$dir/postgres.log; [ ${#as_db[@]} -eq 0 ] || pg_log=$data.log
"${as_db[@]}" "$bin/pg_ctl" -D "$data" -l "$pg_log" -w -s \
  -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $socket" start
stop() { "${as_db[@]}" "$bin/pg_ctl" -D "$data" -m fast -w -s stop || true; }
trap stop EXIT
export PGPASSWORD=$password
if ! "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U realign -d postgres -tAc "select 1 from pg_database where datname='mlflow'" | grep -q 1; then
  "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U realign -d postgres -qc "create database mlflow" >/dev/null
fi
echo "tracking server: http://127.0.0.1:$port (PostgreSQL on 127.0.0.1:$pg_port, artifacts in $dir/artifacts)" >&2
# Not exec: the EXIT trap must stop PostgreSQL when the server ends.
"$mlflow" server --host 127.0.0.1 --port "$port" --workers "${REALIGN_SERVER_WORKERS:-2}" \
  --backend-store-uri "postgresql+psycopg2://realign:$password@127.0.0.1:$pg_port/mlflow" \
  --artifacts-destination "$dir/artifacts" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; stop' EXIT
trap 'exit 0' INT TERM
wait $server
