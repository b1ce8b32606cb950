#!/usr/bin/env bash
# Local service stack for the inventory pipeline, without Docker:
#   kafka       Apache Kafka 4.1 (single node, KRaft combined mode) from its Maven Central jars
#   redis       Debian's redis-server
#   opensearch  OpenSearch 2.19 (Maven Central's integ-test-zip: plain HTTP, no security plugin)
#
# Usage: scripts/stack.sh up|down|status|reset [kafka|redis|opensearch ...]
#        scripts/stack.sh test-deps   (the system tools the tests use besides the services:
#              Chromium for the product-page test, promtool and Prometheus, openssl)
#        scripts/stack.sh kafka-cli TOOL [args...]   (TOOL: topics, console-producer,
#              console-consumer, consumer-groups, get-offsets, configs, or a main class name)
#        scripts/stack.sh cluster-up|cluster-down|cluster-status|cluster-reset [NODE ...]
#        scripts/stack.sh cluster-kill NODE   (SIGKILL one node: a broker crash, for tests)
#        scripts/stack.sh cluster-bootstrap   (prints the cluster's bootstrap servers)
#
#   up      start the services (downloads once into $STACK_DIR) and wait until each answers
#   down    stop them (TERM, then KILL) and check that nothing of ours still holds a port
#   status  print up/down for each service; exit 1 if any requested service is down
#   reset   down, then delete the services' data, logs and generated config (downloads are kept)
#
# A real Kafka cluster, beside the single broker (other ports, other dirs, same jars):
#   cluster-up      start 3 Kafka nodes (NODE: 1 2 3; default all): KRaft combined mode,
#                   each JVM a broker and one of 3 controller voters (a static quorum), so
#                   one lost node costs neither the metadata quorum nor an ISR of 2. Brokers
#                   listen on $KAFKA_CLUSTER_PORT..+2 (19092-19094), controllers on
#                   $KAFKA_CLUSTER_CONTROLLER_PORT..+2 (19192-19194); default replication
#                   factor 3, min.insync.replicas 2 (scripts/stack/kafka-cluster.properties).
#                   Starts only the nodes that are down (a killed node is restarted), then
#                   waits until each answers
#   cluster-down    stop the nodes (TERM, then KILL)       cluster-kill NODE  SIGKILL one node
#   cluster-status  up/down of each node; exit 1 if any is down
#   cluster-reset   cluster-down, then delete its data and logs
# Its files live in $KAFKA_CLUSTER_DIR (default $STACK_DIR/cluster), node<N>/{data,logs}.
#
# Services default to $STACK_SERVICES or all three. Everything lives under
# $STACK_DIR (default <repo>/.stack). Everything binds 127.0.0.1 only.
#
# Environment (defaults in brackets):
#   STACK_DIR [<repo>/.stack]  STACK_SERVICES [kafka redis opensearch]
#   STACK_TIMEOUT [180] seconds each service may take to answer
#   STACK_STOP_TIMEOUT [30] seconds between TERM and KILL on down
#   STACK_JAVA_HOME [JAVA_HOME, java on PATH, /usr/lib/jvm/*: first Java 17..23 found]
#   KAFKA_VERSION [4.1.1]  KAFKA_PORT [9092]  KAFKA_CONTROLLER_PORT [9093]
#   KAFKA_NUM_PARTITIONS [8]  KAFKA_HEAP_OPTS [-Xms512m -Xmx512m]
#   KAFKA_EXTRA_CONFIG [] a properties file appended to server.properties (later keys win)
#   KAFKA_SCRAM_USERS  [] "name:password ..." SCRAM-SHA-512 and -256 users created when the
#                         storage is formatted (KRaft keeps them in its metadata)
#   KAFKA_LIBS [$STACK_DIR/kafka-libs] the Kafka jars (another checkout's, to share one download)
#   KAFKA_CLUSTER_DIR [$STACK_DIR/cluster]  KAFKA_CLUSTER_PORT [19092]
#   KAFKA_CLUSTER_CONTROLLER_PORT [19192]  KAFKA_CLUSTER_HEAP_OPTS [-Xms320m -Xmx320m]
#   REDIS_PORT [6379]
#   OPENSEARCH_VERSION [2.19.6]  OPENSEARCH_PORT [9200]  OPENSEARCH_TRANSPORT_PORT [9300]
#   OPENSEARCH_JAVA_OPTS [-Xms512m -Xmx512m]  OPENSEARCH_USER [opensearch] (used when root)
#
# As root, missing Debian packages (redis-server, a Java 17 runtime, maven,
# unzip) are installed with apt-get and OpenSearch, which refuses to run as
# root, runs as the system user $OPENSEARCH_USER (created if missing). As any
# other user everything runs as that user, and a missing package is named with
# the command that installs it. When that system user cannot reach $STACK_DIR
# (a checkout below /root or a mode-700 directory), OpenSearch's files go to
# /var/tmp/inventory-stack-<n> instead, recorded in $STACK_DIR/opensearch.base.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
TEMPLATE_DIR=$SCRIPT_DIR/stack

STACK_DIR=${STACK_DIR:-$REPO_DIR/.stack}
case $STACK_DIR in /*) ;; *) STACK_DIR=$PWD/$STACK_DIR ;; esac
STACK_TIMEOUT=${STACK_TIMEOUT:-180}
STACK_STOP_TIMEOUT=${STACK_STOP_TIMEOUT:-30}
HOST=127.0.0.1

KAFKA_VERSION=${KAFKA_VERSION:-4.1.1}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
KAFKA_NUM_PARTITIONS=${KAFKA_NUM_PARTITIONS:-8}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}
KAFKA_EXTRA_CONFIG=${KAFKA_EXTRA_CONFIG:-}
KAFKA_SCRAM_USERS=${KAFKA_SCRAM_USERS:-}
REDIS_PORT=${REDIS_PORT:-6379}
OPENSEARCH_VERSION=${OPENSEARCH_VERSION:-2.19.6}
OPENSEARCH_PORT=${OPENSEARCH_PORT:-9200}
OPENSEARCH_TRANSPORT_PORT=${OPENSEARCH_TRANSPORT_PORT:-9300}
OPENSEARCH_JAVA_OPTS=${OPENSEARCH_JAVA_OPTS:--Xms512m -Xmx512m}
OPENSEARCH_USER=${OPENSEARCH_USER:-opensearch}
ALL_SERVICES="kafka redis opensearch"

KAFKA_LIBS=${KAFKA_LIBS:-$STACK_DIR/kafka-libs}
KAFKA_CLUSTER_DIR=${KAFKA_CLUSTER_DIR:-$STACK_DIR/cluster}
case $KAFKA_CLUSTER_DIR in /*) ;; *) KAFKA_CLUSTER_DIR=$PWD/$KAFKA_CLUSTER_DIR ;; esac
KAFKA_CLUSTER_PORT=${KAFKA_CLUSTER_PORT:-19092}
KAFKA_CLUSTER_CONTROLLER_PORT=${KAFKA_CLUSTER_CONTROLLER_PORT:-19192}
KAFKA_CLUSTER_HEAP_OPTS=${KAFKA_CLUSTER_HEAP_OPTS:--Xms320m -Xmx320m}
CLUSTER_NODES="1 2 3"
KAFKA_RUN=$STACK_DIR/kafka
REDIS_RUN=$STACK_DIR/redis
# OpenSearch normally lives in $STACK_DIR too; see os_locate for the exception.
OS_BASE_FILE=$STACK_DIR/opensearch.base

# ---------------------------------------------------------------- output ---
SCRIPT_TAG=stack
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
row() { printf '%-10s %-16s %s\n' "$1" "$2" "$3"; }

# --------------------------------------------------------------- packages ---
POLICY_RC_CREATED=
cleanup() { if [ -n "$POLICY_RC_CREATED" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

apt_install() { # pkg...: install Debian packages as root, or say how to
  is_root || die "missing Debian package(s) $*: install with: sudo apt-get install -y $*"
  command -v apt-get >/dev/null || die "missing $* and no apt-get on this machine to install it"
  say "installing Debian package(s): $* (apt-get)"
  mkdir -p "$STACK_DIR"
  local log=$STACK_DIR/apt.log
  # Keep the package from starting its own system service (a system
  # redis-server on 6379 would take our port).
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=1
  fi
  local -a inst=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@")
  if ! "${inst[@]}" >"$log" 2>&1; then
    say "apt-get install failed; running apt-get update and trying again"
    apt-get update -q >>"$log" 2>&1 || true
    if ! "${inst[@]}" >>"$log" 2>&1; then
      tail_log apt-get "$log"
      die "apt-get install -y $* failed (full log: $log)"
    fi
  fi
  cleanup; POLICY_RC_CREATED=
}

# ------------------------------------------------------------------- java ---

JAVA_HOME_SEL=
find_java() { # sets JAVA_HOME_SEL to a Java 17..23 (Kafka 4.1 needs >= 17; OpenSearch 2.19 < 24)
  [ -n "$JAVA_HOME_SEL" ] && return 0
  local c m seen=""
  if [ -n "${STACK_JAVA_HOME:-}" ]; then
    [ -x "$STACK_JAVA_HOME/bin/java" ] || die "STACK_JAVA_HOME=$STACK_JAVA_HOME has no bin/java"
    m=$(java_major "$STACK_JAVA_HOME/bin/java")
    [ -n "$m" ] && [ "$m" -ge 17 ] && [ "$m" -le 23 ] ||
      die "STACK_JAVA_HOME=$STACK_JAVA_HOME is Java ${m:-?}; need 17..23 (Kafka 4.1 needs >= 17, OpenSearch 2.19 runs on 17..23)"
    JAVA_HOME_SEL=$STACK_JAVA_HOME
    return 0
  fi
  local -a cands=()
  [ -n "${JAVA_HOME:-}" ] && cands+=("$JAVA_HOME")
  if command -v java >/dev/null 2>&1; then
    c=$(readlink -f "$(command -v java)"); cands+=("${c%/bin/java}")
  fi
  for c in /usr/lib/jvm/java-17-openjdk-* /usr/lib/jvm/java-21-openjdk-* /usr/lib/jvm/*; do
    [ -d "$c" ] && cands+=("$c")
  done
  for c in "${cands[@]}"; do
    [ -x "$c/bin/java" ] || continue
    m=$(java_major "$c/bin/java")
    if [ -n "$m" ] && [ "$m" -ge 17 ] && [ "$m" -le 23 ]; then
      JAVA_HOME_SEL=$c
      return 0
    fi
    seen="$seen Java ${m:-?} at $c;"
  done
  if [ -z "$seen" ] && is_root; then
    say "no Java found"
    apt_install openjdk-17-jre-headless
    find_java
    return 0
  fi
  if [ -n "$seen" ]; then
    die "wrong Java version: found${seen} need Java 17..23 (Kafka 4.1 needs >= 17, OpenSearch 2.19 runs on 17..23). Install one (sudo apt-get install -y openjdk-17-jre-headless) or set STACK_JAVA_HOME"
  fi
  die "no Java found: Kafka and OpenSearch need Java 17. Install it with: sudo apt-get install -y openjdk-17-jre-headless (or set STACK_JAVA_HOME)"
}

# -------------------------------------------------------------- processes ---

os_base() { # where OpenSearch's install and runtime dirs are (see os_locate)
  if [ -s "$OS_BASE_FILE" ]; then cat "$OS_BASE_FILE"; else printf '%s' "$STACK_DIR"; fi
}

pid_is_ours() { # pid: started from this stack (its command line or cwd is under our dirs)
  local cmd cwd d
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || true
  cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || true
  for d in "$STACK_DIR" "$(os_base)"; do
    case "$cmd" in *"$d/"*) return 0 ;; esac
    case "$cwd/" in "$d/"*) return 0 ;; esac
  done
  return 1
}

LAUNCH_PID=
launch() { # outfile cmd...: start cmd detached, in its own session, no fds of ours
  local out=$1; shift
  nohup setsid "$@" </dev/null >>"$out" 2>&1 9>&- &
  LAUNCH_PID=$!
}

# ---------------------------------------------------------------- service ---
# Per-service facts: svc_pidfile, svc_ports, svc_addr, svc_answers, svc_logs.
svc_pidfile() {
  case $1 in
    kafka) echo "$KAFKA_RUN/kafka.pid" ;;
    redis) echo "$REDIS_RUN/redis.pid" ;;
    opensearch) echo "$(os_base)/opensearch/opensearch.pid" ;;
  esac
}
svc_ports() {
  case $1 in
    kafka) echo "$KAFKA_PORT $KAFKA_CONTROLLER_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
    opensearch) echo "$OPENSEARCH_PORT $OPENSEARCH_TRANSPORT_PORT" ;;
  esac
}
svc_addr() {
  case $1 in
    kafka) echo "$HOST:$KAFKA_PORT" ;;
    redis) echo "$HOST:$REDIS_PORT" ;;
    opensearch) echo "$HOST:$OPENSEARCH_PORT" ;;
  esac
}
svc_tail_logs() { # name: the last lines of its logs, on stderr
  local b
  case $1 in
    kafka) tail_log kafka "$KAFKA_RUN/logs/kafka.out" "$KAFKA_RUN/logs/server.log" ;;
    redis) tail_log redis "$REDIS_RUN/redis.out" "$REDIS_RUN/redis.log" ;;
    opensearch)
      b=$(os_base)/opensearch
      tail_log opensearch "$b/opensearch.out" "$b/logs/inventory-local.log" ;;
  esac
}

svc_pid() { # name: pid of our running process, from its pid file or else its port
  local f pid="" port
  f=$(svc_pidfile "$1")
  [ -s "$f" ] && pid=$(tr -dc '0-9' <"$f" 2>/dev/null)
  if pid_alive "$pid" && pid_is_ours "$pid"; then echo "$pid"; return 0; fi
  # Pid file lost (deleted by hand, another checkout's reset): a process of
  # this stack on the service's port is still ours.
  port=$(svc_ports "$1"); port=${port%% *}
  for pid in $(port_pids "$port"); do
    if pid_alive "$pid" && pid_is_ours "$pid"; then
      (echo "$pid" >"$f") 2>/dev/null || true
      echo "$pid"; return 0
    fi
  done
  return 1
}

http_get() { # port path: body of a GET on 127.0.0.1, empty on failure
  if command -v curl >/dev/null 2>&1; then
    curl -s -m 30 "http://$HOST:$1$2" 2>/dev/null || true
  else
    timeout 30 bash -c 'exec 3<>/dev/tcp/$0/$1 && printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3 && sed "1,/^\r\?$/d" <&3' \
      "$HOST" "$1" "$2" 2>/dev/null || true
  fi
}

svc_answers() { # name: the service answers a real request
  case $1 in
    kafka)
      port_open "$KAFKA_PORT" && grep -q 'Kafka Server started' "$KAFKA_RUN/logs/server.log" 2>/dev/null ;;
    redis)
      [ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] ;;
    opensearch)
      http_get "$OPENSEARCH_PORT" "/_cluster/health" | grep -Eq '"status":"(green|yellow)"' ;;
  esac
}

svc_wait() { # name since [launcher-pid]: wait for the service to answer, or fail with its log
  local name=$1 since=$2 launcher=${3:-} pid
  while :; do
    pid=$(svc_pid "$name") || pid=
    if [ "$name" = opensearch ] && [ -n "$pid" ]; then
      # blocks server-side up to 10 s, so this loop does not spin
      http_get "$OPENSEARCH_PORT" "/_cluster/health?wait_for_status=yellow&timeout=10s" |
        grep -Eq '"status":"(green|yellow)"' && return 0
    elif [ -n "$pid" ] && svc_answers "$name"; then
      return 0
    fi
    # No pid file yet is fine while the process we launched still runs.
    if [ -z "$pid" ] && ! pid_alive "$launcher" && [ $((SECONDS - since)) -ge 3 ]; then
      svc_tail_logs "$name"
      die "$name exited during startup (see its log above)"
    fi
    if [ $((SECONDS - since)) -ge "$STACK_TIMEOUT" ]; then
      svc_tail_logs "$name"
      svc_stop "$name" >/dev/null 2>&1 || true
      die "$name did not come up within ${STACK_TIMEOUT}s on $(svc_addr "$name") (stopped it; log above; raise STACK_TIMEOUT if the machine is just slow)"
    fi
    sleep 0.5
  done
}

svc_stop() { # name: stop our process, then anything of ours still on its ports
  local name=$1 f pid p port foreign=""
  f=$(svc_pidfile "$name")
  if pid=$(svc_pid "$name"); then stop_pid "$name" "$pid"; fi
  rm -f "$f"
  for port in $(svc_ports "$name"); do
    for p in $(port_pids "$port"); do
      if pid_is_ours "$p"; then
        warn "$name: pid $p of this stack still listens on $port: stopping it"
        stop_pid "$name" "$p"
      else
        foreign="$foreign port $port: pid $p ($(pid_cmdline "$p"))"
      fi
    done
  done
  [ -z "$foreign" ] || warn "$name: left alone, not started by this stack:$foreign"
  return 0
}

check_ports_free() { # name: its ports must be free before we start it
  local port
  for port in $(svc_ports "$1"); do
    if port_open "$port" || [ -n "$(port_pids "$port")" ]; then
      die "$1 cannot start: port $port is already taken by$(describe_port "$port"). Stop that process or pick other ports (KAFKA_PORT, KAFKA_CONTROLLER_PORT, REDIS_PORT, OPENSEARCH_PORT, OPENSEARCH_TRANSPORT_PORT)"
    fi
  done
}

# ------------------------------------------------------------------ maven ---
run_mvn() { # log what mvn-args...: run maven quietly, show its error lines on failure
  local log=$1 what=$2; shift 2
  need_cmd mvn maven
  if ! JAVA_HOME=$JAVA_HOME_SEL mvn -B -q -U -Dstyle.color=never "$@" >"$log" 2>&1; then
    local line
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 '\[ERROR\]') || line=$(tail -n 5 "$log")
    printf 'mvn: %s\n' "$line" >&2
    die "download of $what from Maven Central refused or failed (mvn's error above; full log: $log)"
  fi
}

# ------------------------------------------------------------------ kafka ---
kafka_install() { # downloads once into $KAFKA_LIBS
  local stamp=$KAFKA_LIBS/.complete
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$KAFKA_VERSION" ]; then return 0; fi
  say "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central (once) ..."
  local tmp=$STACK_DIR/kafka-libs.tmp t0=$SECONDS
  rm -rf "$tmp"
  run_mvn "$STACK_DIR/mvn-kafka.log" "org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies" \
    -f "$TEMPLATE_DIR/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp"
  [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || die "maven ran but $tmp has no kafka_2.13-$KAFKA_VERSION.jar"
  echo "$KAFKA_VERSION" >"$tmp/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  local jars=("$KAFKA_LIBS"/*.jar)
  say "kafka: ${#jars[@]} jars in $KAFKA_LIBS ($((SECONDS - t0))s)"
}

kafka_java() { "$JAVA_HOME_SEL/bin/java" "$@"; }

kafka_start() {
  local data=$KAFKA_RUN/data logs=$KAFKA_RUN/logs props=$KAFKA_RUN/server.properties
  mkdir -p "$data" "$logs"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@KAFKA_CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
    -e "s|@KAFKA_DATA_DIR@|$data|g" -e "s|@KAFKA_NUM_PARTITIONS@|$KAFKA_NUM_PARTITIONS|g" \
    "$TEMPLATE_DIR/kafka-server.properties" >"$props"
  if [ -n "$KAFKA_EXTRA_CONFIG" ]; then
    [ -r "$KAFKA_EXTRA_CONFIG" ] || die "KAFKA_EXTRA_CONFIG=$KAFKA_EXTRA_CONFIG is not a readable file"
    printf '\n# ---- appended from KAFKA_EXTRA_CONFIG=%s\n' "$KAFKA_EXTRA_CONFIG" >>"$props"
    cat "$KAFKA_EXTRA_CONFIG" >>"$props"
  fi
  cp "$TEMPLATE_DIR/kafka-log4j2.properties" "$KAFKA_RUN/log4j2.properties"

  # The storage keeps the controller's address in its bootstrap voter set.
  local fmt=$KAFKA_RUN/formatted-for
  if [ -f "$data/meta.properties" ]; then
    if [ -f "$fmt" ] && [ "$(cat "$fmt")" != "$HOST:$KAFKA_CONTROLLER_PORT" ]; then
      die "kafka: its storage was formatted for controller $(cat "$fmt"), not $HOST:$KAFKA_CONTROLLER_PORT: run 'scripts/stack.sh reset kafka' (deletes its data) or set KAFKA_CONTROLLER_PORT back"
    fi
  else
    local id
    id=$(kafka_java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>>"$logs/format.log" | tail -n1) ||
      { tail_log kafka "$logs/format.log"; die "kafka: StorageTool random-uuid failed"; }
    local scram=() user
    for user in $KAFKA_SCRAM_USERS; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=${user%%:*},password=${user#*:}]")
      scram+=(--add-scram "SCRAM-SHA-256=[name=${user%%:*},password=${user#*:}]")
    done
    kafka_java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$id" -c "$props" \
      --standalone --ignore-formatted "${scram[@]}" >>"$logs/format.log" 2>&1 ||
      { tail_log kafka "$logs/format.log"; die "kafka: formatting the storage in $data failed"; }
    echo "$HOST:$KAFKA_CONTROLLER_PORT" >"$fmt"
  fi

  # A fresh server.log per run, so the readiness check reads this run's lines.
  [ -f "$logs/server.log" ] && mv -f "$logs/server.log" "$logs/server.log.prev"
  [ -f "$logs/kafka.out" ] && mv -f "$logs/kafka.out" "$logs/kafka.out.prev"
  rm -f "$KAFKA_RUN/kafka.pid"
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of flags
  launch "$logs/kafka.out" bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_RUN/kafka.pid" \
    "$JAVA_HOME_SEL/bin/java" $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true -Dkafka.logs.dir="$logs" \
    -Dlog4j2.configurationFile="$KAFKA_RUN/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$props"
}

# -------------------------------------------------------------- cluster ---
# Three Kafka nodes beside the single broker: node N is broker port
# $KAFKA_CLUSTER_PORT+N-1 and controller port $KAFKA_CLUSTER_CONTROLLER_PORT+N-1.
node_dir() { echo "$KAFKA_CLUSTER_DIR/node$1"; }
node_port() { echo $((KAFKA_CLUSTER_PORT + $1 - 1)); }
node_cport() { echo $((KAFKA_CLUSTER_CONTROLLER_PORT + $1 - 1)); }
cluster_bootstrap() {
  local n out=""
  for n in $CLUSTER_NODES; do out="$out${out:+,}$HOST:$(node_port "$n")"; done
  printf '%s\n' "$out"
}
cluster_voters() {
  local n out=""
  for n in $CLUSTER_NODES; do out="$out${out:+,}$n@$HOST:$(node_cport "$n")"; done
  printf '%s' "$out"
}

node_pid() { # node: pid of its running JVM (pid file, else its broker port), if ours
  local d f pid="" p
  d=$(node_dir "$1"); f=$d/kafka.pid
  [ -s "$f" ] && pid=$(tr -dc '0-9' <"$f" 2>/dev/null)
  node_pid_is_ours() {
    case "$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null)" in *"$d/"*) return 0 ;; esac
    return 1
  }
  if pid_alive "$pid" && node_pid_is_ours "$pid"; then echo "$pid"; return 0; fi
  for p in $(port_pids "$(node_port "$1")"); do
    if pid_alive "$p" && node_pid_is_ours "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

node_answers() { # node: its broker port accepts and this run's log says it started
  port_open "$(node_port "$1")" && grep -q 'Kafka Server started' "$(node_dir "$1")/logs/server.log" 2>/dev/null
}

node_start() { # node: write its config, format its storage once, launch its JVM
  local n=$1 d data logs props port cport
  d=$(node_dir "$n"); data=$d/data; logs=$d/logs; props=$d/server.properties
  port=$(node_port "$n"); cport=$(node_cport "$n")
  for p in "$port" "$cport"; do
    if port_open "$p" || [ -n "$(port_pids "$p")" ]; then
      die "cluster node $n cannot start: port $p is already taken by$(describe_port "$p") (set KAFKA_CLUSTER_PORT / KAFKA_CLUSTER_CONTROLLER_PORT)"
    fi
  done
  mkdir -p "$data" "$logs"
  sed -e "s|@NODE_ID@|$n|g" -e "s|@VOTERS@|$(cluster_voters)|g" \
    -e "s|@BROKER_PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" \
    -e "s|@DATA_DIR@|$data|g" -e "s|@KAFKA_NUM_PARTITIONS@|$KAFKA_NUM_PARTITIONS|g" \
    "$TEMPLATE_DIR/kafka-cluster.properties" >"$props"
  cp "$TEMPLATE_DIR/kafka-log4j2.properties" "$d/log4j2.properties"
  # one cluster id for the three nodes; the voter set is part of each node's storage
  local idfile=$KAFKA_CLUSTER_DIR/cluster.id fmt=$d/formatted-for voters
  voters=$(cluster_voters)
  if [ -f "$data/meta.properties" ]; then
    if [ -f "$fmt" ] && [ "$(cat "$fmt")" != "$voters" ]; then
      die "cluster node $n: its storage was formatted for voters $(cat "$fmt"), not $voters: run 'scripts/stack.sh cluster-reset' (deletes the cluster's data) or set the ports back"
    fi
  else
    if [ ! -s "$idfile" ]; then
      kafka_java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>>"$logs/format.log" |
        tail -n1 >"$idfile" || { tail_log kafka "$logs/format.log"; die "cluster: StorageTool random-uuid failed"; }
    fi
    kafka_java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format -t "$(cat "$idfile")" -c "$props" \
      --ignore-formatted >>"$logs/format.log" 2>&1 ||
      { tail_log "cluster node $n" "$logs/format.log"; die "cluster node $n: formatting $data failed"; }
    echo "$voters" >"$fmt"
  fi
  [ -f "$logs/server.log" ] && mv -f "$logs/server.log" "$logs/server.log.prev"
  [ -f "$logs/kafka.out" ] && mv -f "$logs/kafka.out" "$logs/kafka.out.prev"
  rm -f "$d/kafka.pid"
  # shellcheck disable=SC2086 # KAFKA_CLUSTER_HEAP_OPTS is a list of flags
  launch "$logs/kafka.out" bash -c 'echo $$ >"$0"; exec "$@"' "$d/kafka.pid" \
    "$JAVA_HOME_SEL/bin/java" $KAFKA_CLUSTER_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExitOnOutOfMemoryError -XX:TieredStopAtLevel=1 -Xss512k \
    -Djava.awt.headless=true -Dkafka.logs.dir="$logs" \
    -Dlog4j2.configurationFile="$d/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$props"
}

cluster_nodes_arg() { # NODE...: validated node numbers (default all) into NODES
  NODES=()
  local n
  if [ $# -eq 0 ]; then read -r -a NODES <<<"$CLUSTER_NODES"; return 0; fi
  for n in "$@"; do
    case " $CLUSTER_NODES " in *" $n "*) NODES+=("$n") ;; *) die "unknown cluster node '$n' (nodes: $CLUSTER_NODES)" ;; esac
  done
}

cluster_lock() {
  mkdir -p "$KAFKA_CLUSTER_DIR"
  exec 9>"$KAFKA_CLUSTER_DIR/.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -w 600 9; then
    die "another scripts/stack.sh holds $KAFKA_CLUSTER_DIR/.lock"
  fi
}

cmd_cluster_up() {
  local t0=$SECONDS n pid
  local -a started=()
  cluster_nodes_arg "$@"
  cluster_lock
  find_java
  kafka_install
  for n in "${NODES[@]}"; do
    if ! node_pid "$n" >/dev/null; then node_start "$n"; started+=("$n"); fi
  done
  # every node, also one that was already running (it may still be starting); a
  # single node cannot answer before a quorum of voters is up, so launch first, wait after
  local since=$SECONDS
  for n in "${NODES[@]}"; do
    while ! { node_pid "$n" >/dev/null && node_answers "$n"; }; do
      if ! node_pid "$n" >/dev/null && [ $((SECONDS - since)) -ge 5 ]; then
        tail_log "cluster node $n" "$(node_dir "$n")/logs/kafka.out" "$(node_dir "$n")/logs/server.log"
        die "cluster node $n exited during startup (see its log above)"
      fi
      if [ $((SECONDS - since)) -ge "$STACK_TIMEOUT" ]; then
        tail_log "cluster node $n" "$(node_dir "$n")/logs/kafka.out" "$(node_dir "$n")/logs/server.log"
        die "cluster node $n did not come up within ${STACK_TIMEOUT}s on $HOST:$(node_port "$n")"
      fi
      sleep 0.5
    done
  done
  for n in "${NODES[@]}"; do
    pid=$(node_pid "$n") || pid='?'
    if [[ " ${started[*]-} " == *" $n "* ]]; then
      row "kafka-$n" "$HOST:$(node_port "$n")" "up (pid $pid, started)"
    else
      row "kafka-$n" "$HOST:$(node_port "$n")" "up (pid $pid, was already running)"
    fi
  done
  say "cluster up in $((SECONDS - t0))s; bootstrap $(cluster_bootstrap) (data in $KAFKA_CLUSTER_DIR)"
}

cmd_cluster_down() {
  local n pid
  cluster_nodes_arg "$@"
  cluster_lock
  # TERM every node first, then wait for each: stopped one after the other, the last
  # node has lost its controller quorum and waits out STACK_STOP_TIMEOUT for a
  # controlled shutdown no controller answers any more
  for n in "${NODES[@]}"; do
    if pid=$(node_pid "$n"); then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for n in "${NODES[@]}"; do
    if pid=$(node_pid "$n"); then stop_pid "kafka-$n" "$pid"; fi
    rm -f "$(node_dir "$n")/kafka.pid"
    row "kafka-$n" "$HOST:$(node_port "$n")" "down"
  done
}

cmd_cluster_kill() { # NODE: SIGKILL, no shutdown (a crashed broker)
  local pid
  [ $# -eq 1 ] || die "usage: scripts/stack.sh cluster-kill NODE (one of $CLUSTER_NODES)"
  cluster_nodes_arg "$1"
  pid=$(node_pid "$1") || die "cluster node $1 is not running"
  kill -KILL "$pid"
  while pid_alive "$pid"; do sleep 0.1; done
  row "kafka-$1" "$HOST:$(node_port "$1")" "killed (pid $pid, SIGKILL)"
}

cmd_cluster_status() {
  local n pid bad=0
  cluster_nodes_arg "$@"
  for n in "${NODES[@]}"; do
    if pid=$(node_pid "$n"); then
      if node_answers "$n"; then
        row "kafka-$n" "$HOST:$(node_port "$n")" "up (pid $pid)"
      else
        row "kafka-$n" "$HOST:$(node_port "$n")" "down: running (pid $pid) but not answering yet"; bad=1
      fi
    else
      row "kafka-$n" "$HOST:$(node_port "$n")" "down"; bad=1
    fi
  done
  return $bad
}

cmd_cluster_reset() {
  cmd_cluster_down
  rm -rf "${KAFKA_CLUSTER_DIR:?}"/node[0-9]* "$KAFKA_CLUSTER_DIR/cluster.id"
  say "cluster: data, logs and generated config deleted"
}

# ------------------------------------------------------------------ redis ---
redis_install() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  say "redis: redis-server is not installed"
  apt_install redis-server
  command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after apt-get install"
}

redis_start() {
  LAUNCH_PID=
  mkdir -p "$REDIS_RUN/data"
  rm -f "$REDIS_RUN/redis.pid"
  [ -f "$REDIS_RUN/redis.log" ] && mv -f "$REDIS_RUN/redis.log" "$REDIS_RUN/redis.log.prev"
  : >"$REDIS_RUN/redis.out"
  # --daemonize: redis forks, writes its pid file, and this returns.
  redis-server --port "$REDIS_PORT" --bind "$HOST" --save '' --appendonly no \
    --daemonize yes --pidfile "$REDIS_RUN/redis.pid" --logfile "$REDIS_RUN/redis.log" \
    --dir "$REDIS_RUN/data" </dev/null >>"$REDIS_RUN/redis.out" 2>&1 9>&- ||
    { tail_log redis "$REDIS_RUN/redis.out" "$REDIS_RUN/redis.log"; die "redis-server refused to start"; }
}

# ------------------------------------------------------------- opensearch ---
OS_HOME='' OS_RUN=''

os_locate() { # sets OS_HOME (the unzipped distribution) and OS_RUN (config, data, logs)
  local base=$STACK_DIR
  if is_root; then
    if ! id -u "$OPENSEARCH_USER" >/dev/null 2>&1; then
      say "opensearch: it refuses to run as root; creating system user '$OPENSEARCH_USER'"
      need_cmd useradd passwd
      useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$OPENSEARCH_USER" ||
        die "could not create system user $OPENSEARCH_USER (useradd --system)"
    fi
    # That user must reach its files: when $STACK_DIR sits below a directory it
    # cannot enter (/root, a mode-700 temp dir), use a directory it can.
    if ! runuser -u "$OPENSEARCH_USER" -- test -x "$STACK_DIR" 2>/dev/null; then
      base=/var/tmp/inventory-stack-$(printf '%s' "$STACK_DIR" | cksum | cut -d' ' -f1)
      mkdir -p "$base" && chmod 755 "$base"
      say "opensearch: user $OPENSEARCH_USER cannot enter $STACK_DIR; using $base for it"
    fi
  fi
  printf '%s\n' "$base" >"$OS_BASE_FILE"
  OS_HOME=$base/opensearch-$OPENSEARCH_VERSION
  OS_RUN=$base/opensearch
}

os_install() { # downloads once, unzips into $OS_HOME
  local stamp=$OS_HOME/.complete
  [ -f "$stamp" ] && return 0
  local art=org.opensearch.distribution.integ-test-zip:opensearch:$OPENSEARCH_VERSION:zip
  local dl=$STACK_DIR/downloads t0=$SECONDS
  say "opensearch: fetching OpenSearch $OPENSEARCH_VERSION from Maven Central (once) ..."
  mkdir -p "$dl"
  # -f: a project of ours, whatever pom.xml the current directory may hold
  run_mvn "$STACK_DIR/mvn-opensearch.log" "$art" -f "$TEMPLATE_DIR/kafka-pom.xml" \
    dependency:copy -Dartifact="$art" -DoutputDirectory="$dl"
  local zip=$dl/opensearch-$OPENSEARCH_VERSION.zip
  [ -f "$zip" ] || die "maven ran but $zip is missing"
  need_cmd unzip unzip
  local base tmp
  base=$(dirname "$OS_HOME"); tmp=$base/opensearch-unzip.tmp
  rm -rf "$tmp" "$OS_HOME"; mkdir -p "$tmp"
  unzip -q "$zip" -d "$tmp" || die "could not unzip $zip"
  [ -d "$tmp/opensearch-$OPENSEARCH_VERSION/lib" ] || die "$zip has no opensearch-$OPENSEARCH_VERSION/lib"
  mv "$tmp/opensearch-$OPENSEARCH_VERSION" "$OS_HOME"
  rm -rf "$tmp" "$zip"
  rmdir "$dl" 2>/dev/null || true
  chmod -R a+rX "$OS_HOME"
  touch "$stamp"
  say "opensearch: unpacked into $OS_HOME ($((SECONDS - t0))s)"
}

os_start() {
  local conf=$OS_RUN/config
  mkdir -p "$conf" "$OS_RUN/data" "$OS_RUN/logs" "$OS_RUN/tmp"
  # Our own copy of the config dir: OpenSearch writes its keystore there, and
  # jvm.options' relative paths (logs/gc.log, data) would land in the cwd.
  cp -R "$OS_HOME/config/." "$conf/"
  sed -i -e '/^-Xm[sx]/d' \
    -e "s|file=logs/gc.log|file=$OS_RUN/logs/gc.log|" \
    -e "s|HeapDumpPath=data|HeapDumpPath=$OS_RUN/logs|" \
    -e "s|ErrorFile=logs/|ErrorFile=$OS_RUN/logs/|" "$conf/jvm.options"
  # Log to files only (logs/inventory-local.log); opensearch.out keeps what the
  # JVM and a failed bootstrap print.
  sed -i -e '/^rootLogger.appenderRef.console.ref/d' "$conf/log4j2.properties"
  local pidfile=$OS_RUN/opensearch.pid
  rm -f "$pidfile"
  [ -f "$OS_RUN/opensearch.out" ] && mv -f "$OS_RUN/opensearch.out" "$OS_RUN/opensearch.out.prev"
  : >"$OS_RUN/opensearch.out"
  local -a as=()
  if is_root; then
    chown -R "$OPENSEARCH_USER:" "$OS_RUN"
    as=(runuser -u "$OPENSEARCH_USER" --)
  fi
  # cwd = its home (env -C): bin/opensearch calls bin/opensearch-keystore by a relative path.
  launch "$OS_RUN/opensearch.out" "${as[@]}" env -C "$OS_HOME" \
    OPENSEARCH_JAVA_HOME="$JAVA_HOME_SEL" JAVA_HOME="$JAVA_HOME_SEL" \
    OPENSEARCH_PATH_CONF="$conf" OPENSEARCH_TMPDIR="$OS_RUN/tmp" \
    OPENSEARCH_JAVA_OPTS="$OPENSEARCH_JAVA_OPTS" \
    "$OS_HOME/bin/opensearch" -p "$pidfile" \
    -Ecluster.name=inventory-local -Enode.name=local \
    -Ediscovery.type=single-node -Enetwork.host="$HOST" \
    -Ehttp.port="$OPENSEARCH_PORT" -Etransport.port="$OPENSEARCH_TRANSPORT_PORT" \
    -Epath.data="$OS_RUN/data" -Epath.logs="$OS_RUN/logs" \
    -Ecluster.routing.allocation.disk.threshold_enabled=false \
    -Eaction.destructive_requires_name=false
}

# --------------------------------------------------------------- commands ---
lock() { # one up/down/reset at a time per $STACK_DIR
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -w 600 9; then
    die "another scripts/stack.sh holds $STACK_DIR/.lock"
  fi
}

cmd_up() {
  local t0=$SECONDS svc pid
  local -a start=() already=()
  lock
  for svc in "${SERVICES[@]}"; do
    if svc_pid "$svc" >/dev/null; then already+=("$svc"); else start+=("$svc"); fi
  done
  # Fail fast, before any download: tools, then ports.
  for svc in "${start[@]}"; do
    case $svc in
      kafka | opensearch) find_java ;;
      redis) redis_install ;;
    esac
  done
  for svc in "${start[@]}"; do check_ports_free "$svc"; done
  if [[ " ${start[*]-} " == *" kafka "* ]] && [ -n "$KAFKA_EXTRA_CONFIG" ] && [ ! -r "$KAFKA_EXTRA_CONFIG" ]; then
    die "KAFKA_EXTRA_CONFIG=$KAFKA_EXTRA_CONFIG is not a readable file"
  fi

  local -A since=() launcher=()
  for svc in "${start[@]}"; do
    case $svc in
      kafka) kafka_install; kafka_start ;;
      redis) redis_start ;;
      opensearch) os_locate; os_install; os_start ;;
    esac
    since[$svc]=$SECONDS launcher[$svc]=$LAUNCH_PID
  done
  for svc in "${start[@]}"; do svc_wait "$svc" "${since[$svc]}" "${launcher[$svc]}"; done
  # Already running ones: they may still be starting (another up in progress).
  for svc in "${already[@]}"; do svc_wait "$svc" "$SECONDS"; done

  for svc in "${SERVICES[@]}"; do
    pid=$(svc_pid "$svc") || pid='?'
    if [[ " ${already[*]} " == *" $svc "* ]]; then
      row "$svc" "$(svc_addr "$svc")" "up (pid $pid, was already running)"
    else
      row "$svc" "$(svc_addr "$svc")" "up (pid $pid, started)"
    fi
  done
  say "stack up in $((SECONDS - t0))s (logs and data in $STACK_DIR)"
}

cmd_down() {
  local t0=$SECONDS svc i
  lock
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    svc=${SERVICES[$i]}
    svc_stop "$svc"
    row "$svc" "$(svc_addr "$svc")" "down"
  done
  say "stack down in $((SECONDS - t0))s"
}

cmd_status() {
  local svc pid bad=0 port
  for svc in "${SERVICES[@]}"; do
    if pid=$(svc_pid "$svc"); then
      if svc_answers "$svc"; then
        row "$svc" "$(svc_addr "$svc")" "up (pid $pid)"
      else
        row "$svc" "$(svc_addr "$svc")" "down: running (pid $pid) but not answering yet"; bad=1
      fi
    else
      bad=1
      port=$(svc_ports "$svc"); port=${port%% *}
      if port_open "$port"; then
        row "$svc" "$(svc_addr "$svc")" "down; port $port is held by another process:$(describe_port "$port")"
      else
        row "$svc" "$(svc_addr "$svc")" "down"
      fi
    fi
  done
  return $bad
}

cmd_reset() {
  local svc
  cmd_down
  for svc in "${SERVICES[@]}"; do
    case $svc in
      kafka) rm -rf "$KAFKA_RUN" ;;
      redis) rm -rf "$REDIS_RUN" ;;
      opensearch) rm -rf "$(os_base)/opensearch" ;;
    esac
    say "$svc: data, logs and generated config deleted"
  done
  say "downloads kept (kafka-libs, opensearch-<version>)"
}

cmd_kafka_cli() { # TOOL args...: a Kafka command-line tool on the stack's jars
  local tool=${1:-} cls
  [ -n "$tool" ] || die "usage: scripts/stack.sh kafka-cli topics|console-producer|console-consumer|consumer-groups|get-offsets|configs|MAIN.CLASS [args...]"
  shift
  case $tool in
    topics) cls=org.apache.kafka.tools.TopicCommand ;;
    console-producer) cls=org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) cls=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    consumer-groups) cls=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    get-offsets) cls=org.apache.kafka.tools.GetOffsetShell ;;
    configs) cls=kafka.admin.ConfigCommand ;;
    *.*) cls=$tool ;;
    *) die "unknown Kafka tool '$tool'" ;;
  esac
  [ -f "$KAFKA_LIBS/.complete" ] || die "no Kafka jars yet in $KAFKA_LIBS: run scripts/stack.sh up kafka first"
  find_java
  exec "$JAVA_HOME_SEL/bin/java" -Xmx256m -Dlog4j2.level=WARN -cp "$KAFKA_LIBS/*" "$cls" "$@"
}

cmd_test_deps() { # what `make test` needs beyond the services; as root: installed
  local -a missing=()
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_install "${missing[@]}"
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit "${1:-2}"
}

main() {
  local cmd=${1:-}
  [ $# -gt 0 ] && shift
  case $cmd in
    up | down | status | reset) ;;
    kafka-cli) cmd_kafka_cli "$@" ;;
    cluster-up | cluster-down | cluster-status | cluster-reset | cluster-kill)
      "cmd_${cmd//-/_}" "$@"; exit $? ;;
    cluster-bootstrap) cluster_bootstrap; exit 0 ;;
    test-deps) cmd_test_deps; exit 0 ;;
    -h | --help | help) usage 0 ;;
    *) usage 2 ;;
  esac
  local -a req
  if [ $# -gt 0 ]; then req=("$@"); else read -r -a req <<<"${STACK_SERVICES:-$ALL_SERVICES}"; fi
  [ ${#req[@]} -gt 0 ] || read -r -a req <<<"$ALL_SERVICES"
  local s
  SERVICES=()
  for s in "${req[@]}"; do
    case " $ALL_SERVICES " in
      *" $s "*) [[ " ${SERVICES[*]-} " == *" $s "* ]] || SERVICES+=("$s") ;;
      *) die "unknown service '$s' (services: $ALL_SERVICES)" ;;
    esac
  done
  "cmd_$cmd"
}

main "$@"
