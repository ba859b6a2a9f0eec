#!/usr/bin/env bash
# Test services for the `cluster` tests: a private PostgreSQL server and a two-node local Ray cluster.
#
#   bash scripts/services.sh start    # idempotent; writes $STATE/env.sh (source it before pytest)
#   bash scripts/services.sh status
#   bash scripts/services.sh stop     # safe when nothing runs
#
# Settings (environment):
#   AUTOCOMP_SERVICES_DIR  state folder: PostgreSQL data, logs, Ray temp dir, env.sh (/tmp/autocomp-services)
#   AUTOCOMP_PG_PORT       PostgreSQL TCP port on 127.0.0.1 (55432; the system cluster's 5432 is left alone)
#   AUTOCOMP_RAY_PORT      Ray head (GCS) port on 127.0.0.1 (6390; Ray's default 6379 is left alone)
#
# PostgreSQL refuses to run as root: when run as root, initdb/pg_ctl/psql run as the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STATE=${AUTOCOMP_SERVICES_DIR:-/tmp/autocomp-services}
PG_PORT=${AUTOCOMP_PG_PORT:-55432}
RAY_PORT=${AUTOCOMP_RAY_PORT:-6390}
PG_USER=autocomp
PG_PASSWORD=autocomp-secret
PG_DB=autocomp_test
PG_DIR=$STATE/pg          # owned by the user postgres runs as; also holds the unix socket
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
RAY_DIR=$STATE/ray        # Ray's --temp-dir (sessions, logs, sockets): not /tmp/ray
RAY_NODES=2               # head + one worker node
RAY_OBJECT_STORE=200000000
RAY=$ROOT/.venv/bin/ray
PY=$ROOT/.venv/bin/python
ENV_FILE=$STATE/env.sh
POSTGRES_URL="postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
RAY_ADDRESS_="127.0.0.1:$RAY_PORT"
export RAY_USAGE_STATS_ENABLED=0
# Ray 2.60: `ray start --head` enables token auth whenever ~/.ray/auth_token exists (any local
# ray.init() writes one), and drivers given an explicit address then get "InvalidAuthToken". A local
# test cluster needs no auth.
export RAY_AUTH_MODE=disabled

log() { echo "services: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() {  # port_open PORT: something listens on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ---------------------------------------------------------------- PostgreSQL

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}

pg_install() {
  [ -n "$(pg_bin)" ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and there is no apt-get"
  log "installing PostgreSQL (apt-get install postgresql)"
  apt-get install -y -q postgresql >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } \
    || die "could not install the Debian package postgresql"
  [ -n "$(pg_bin)" ] || die "postgresql installed but no /usr/lib/postgresql/*/bin/initdb"
}

# as_pg CMD...: run as the postgres user when root (postgres will not run as root), directly otherwise
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_owner_setup() {
  if [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
    log "creating system user postgres"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres
  fi
  mkdir -p "$PG_DIR"
  chmod 755 "$STATE"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$PG_DIR"; fi
  chmod 700 "$PG_DIR"
}

pg_running() {
  local bin
  bin=$(pg_bin) || return 1
  [ -f "$PG_DATA/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

psql_admin() {  # psql_admin ARGS...: superuser psql over the private unix socket
  as_pg "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres "$@"
}

pg_start() {
  pg_install
  local bin
  bin=$(pg_bin)
  pg_owner_setup
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    rm -rf "$PG_DATA"
    log "initdb $PG_DATA"
    # trust on the private unix socket (its folder is 0700), passwords over TCP
    as_pg "$bin/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log" 2>&1 \
      || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
    # a throwaway test server: durability is not needed, speed is
    cat >>"$PG_DATA/postgresql.conf" <<EOF

# autocomp test server (scripts/services.sh)
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
  fi
  if pg_running; then
    log "PostgreSQL already running ($PG_DATA)"
  else
    if port_open "$PG_PORT"; then
      die "port $PG_PORT is taken by another program; set AUTOCOMP_PG_PORT"
    fi
    log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 \
      -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null \
      || { tail -n 30 "$PG_LOG" >&2 || true; die "pg_ctl start failed (log: $PG_LOG)"; }
  fi
  # role and database (idempotent)
  psql_admin <<EOF
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
EOF
}

pg_stop() {
  if pg_running; then
    log "stopping PostgreSQL"
    as_pg "$(pg_bin)/pg_ctl" -D "$PG_DATA" -w -t 60 -m fast stop >/dev/null
  else
    log "PostgreSQL not running"
  fi
}

pg_status() {
  if pg_running; then
    echo "postgres: running on 127.0.0.1:$PG_PORT, data $PG_DATA, log $PG_LOG"
    echo "postgres: $POSTGRES_URL"
  else
    echo "postgres: not running"
  fi
}

# ---------------------------------------------------------------- Ray

# prints the number of alive nodes and their total CPUs ("N CPUS"), or fails when no head answers
ray_alive() {
  port_open "$RAY_PORT" || return 1
  timeout 60 "$PY" - "$RAY_ADDRESS_" <<'EOF' 2>/dev/null
import sys

import ray

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(len(alive), int(sum(n["Resources"].get("CPU", 0) for n in alive)))
EOF
}

ray_start() {
  [ -x "$RAY" ] || die "$RAY is missing: run scripts/setup.sh first"
  mkdir -p "$RAY_DIR"
  local have=0 cpus=0 out
  if out=$(ray_alive); then
    read -r have cpus <<<"$out"
    log "Ray head already running on $RAY_ADDRESS_ ($have alive nodes, $cpus CPUs)"
  else
    if port_open "$RAY_PORT"; then
      die "port $RAY_PORT is taken but no Ray head answers; set AUTOCOMP_RAY_PORT"
    fi
    log "starting Ray head on $RAY_ADDRESS_"
    # setsid: the daemons outlive the caller's process group (a finished shell job, a Ctrl-C of pytest)
    setsid -w "$RAY" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus 1 \
      --include-dashboard=false --object-store-memory "$RAY_OBJECT_STORE" \
      --disable-usage-stats --temp-dir "$RAY_DIR" >"$STATE/ray-head.log" 2>&1 \
      || { tail -n 30 "$STATE/ray-head.log" >&2; die "ray start --head failed"; }
    have=1
  fi
  local i
  for ((i = have; i < RAY_NODES; i++)); do
    log "starting Ray worker node $i"
    setsid -w "$RAY" start --address "$RAY_ADDRESS_" --node-ip-address 127.0.0.1 --num-cpus 1 \
      --object-store-memory "$RAY_OBJECT_STORE" --disable-usage-stats >"$STATE/ray-node-$i.log" 2>&1 \
      || { tail -n 30 "$STATE/ray-node-$i.log" >&2; die "ray start (worker node $i) failed"; }
  done
  out=$(ray_alive) || die "Ray head on $RAY_ADDRESS_ does not answer after start"
  read -r have cpus <<<"$out"
  [ "$have" -ge "$RAY_NODES" ] || die "Ray cluster has $have alive nodes, expected $RAY_NODES"
  log "Ray cluster: $have alive nodes, $cpus CPUs"
}

ray_pids() {  # this cluster's processes: those naming its temp dir, and their children (agents, workers)
  local p
  for p in $(pgrep -f -- "$RAY_DIR/session_" || true); do
    echo "$p"
    pgrep -P "$p" || true
  done | sort -un
}

ray_stop() {
  # Like `ray stop --force` (SIGKILL; gcs_server ignores SIGTERM for 10+ s), but only this cluster's
  # processes: `ray stop` kills every Ray process on the machine (other sessions, private test
  # clusters, someone's `ray.init()`).
  local pids p i left
  pids=$(ray_pids)
  if [ -z "$pids" ]; then
    log "Ray not running"
    return 0
  fi
  log "stopping Ray ($(echo "$pids" | wc -l) processes)"
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    left=""
    for p in $pids; do
      if [ -e "/proc/$p" ] && ! grep -q '^[^)]*) Z' "/proc/$p/stat" 2>/dev/null; then left="$left $p"; fi
    done
    [ -z "$left" ] && break
    sleep 0.1
  done
  # workers started after the listing exit by themselves within a few seconds of their raylet
  if [ -n "$left" ]; then log "warning: Ray processes still alive:$left"; fi
}

ray_status() {
  local out
  if out=$(ray_alive); then
    read -r have cpus <<<"$out"
    echo "ray: head $RAY_ADDRESS_, $have alive nodes, $cpus CPUs, temp dir $RAY_DIR"
  else
    echo "ray: not running on $RAY_ADDRESS_"
  fi
}

# ---------------------------------------------------------------- main

write_env() {
  cat >"$ENV_FILE" <<EOF
# written by scripts/services.sh start; source it before pytest
export AUTOCOMP_TEST_POSTGRES_URL=$POSTGRES_URL
export AUTOCOMP_TEST_RAY_ADDRESS=$RAY_ADDRESS_
EOF
}

case "${1:-}" in
  start)
    t0=$(date +%s.%N)
    mkdir -p "$STATE"
    pg_start
    ray_start
    write_env
    t1=$(date +%s.%N)
    log "started in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
    echo "services: env file $ENV_FILE (source it: . $ENV_FILE)"
    ;;
  stop)
    ray_stop
    pg_stop
    rm -f "$ENV_FILE"
    ;;
  status)
    pg_status
    ray_status
    if [ -f "$ENV_FILE" ]; then echo "env file: $ENV_FILE"; fi
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
