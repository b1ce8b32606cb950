#!/usr/bin/env bash
# A local Confluent-compatible schema registry for the inventory pipeline, without Docker:
#   Apicurio Registry (Apache-2.0), the Quarkus distribution Maven Central serves as
#   io.apicurio:apicurio-registry-app:<version>:tar.gz:all, with in-memory (H2) storage.
#   Its Confluent API ("ccompat") is at http://127.0.0.1:<port>/apis/ccompat/v7, which
#   is the value for INVENTORY_SCHEMA_REGISTRY_URL. Schemas live in memory: a restart
#   forgets every subject and id.
#
# Usage: scripts/registry.sh up|down|status|url
#
#   up      start it (downloads once into $STACK_DIR) and wait until its Confluent API answers
#   down    stop it (TERM, then KILL) and check that nothing of ours still holds its port
#   status  print up/down; exit 1 if it is down
#   url     print the Confluent-compatible base URL (INVENTORY_SCHEMA_REGISTRY_URL)
#
# Everything lives under $STACK_DIR (default <repo>/.stack, shared with scripts/stack.sh):
# the distribution in apicurio-<version>/, logs in schema-registry/logs/. It binds 127.0.0.1.
#
# Environment (defaults in brackets):
#   STACK_DIR [<repo>/.stack]  SCHEMA_REGISTRY_PORT [8081]
#   APICURIO_VERSION [2.6.13.Final] 2.x runs on Java 17..23; 3.x (e.g. 3.3.3) needs Java >= 21
#   SCHEMA_REGISTRY_MANAGEMENT_PORT [9081] Quarkus management interface (3.x only)
#   SCHEMA_REGISTRY_HEAP_OPTS [-Xms128m -Xmx512m]
#   SCHEMA_REGISTRY_TIMEOUT [120] seconds it may take to answer
#   STACK_STOP_TIMEOUT [30] seconds between TERM and KILL on down
#   SCHEMA_REGISTRY_JAVA_HOME [STACK_JAVA_HOME, JAVA_HOME, java on PATH, /usr/lib/jvm/*:
#                              first Java that fits the version]
#
# As root, missing Debian packages (maven, curl, and for 2.x a Java 17 runtime) are
# installed with apt-get; as any other user the missing package is named. Debian 12 has
# no Java 21 package: 3.x needs one installed by hand (set SCHEMA_REGISTRY_JAVA_HOME).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
TEMPLATE_DIR=$SCRIPT_DIR/stack

STACK_DIR=${STACK_DIR:-$REPO_DIR/.stack}
case $STACK_DIR in /*) ;; *) STACK_DIR=$PWD/$STACK_DIR ;; esac
STACK_STOP_TIMEOUT=${STACK_STOP_TIMEOUT:-30}
HOST=127.0.0.1

SCHEMA_REGISTRY_PORT=${SCHEMA_REGISTRY_PORT:-8081}
SCHEMA_REGISTRY_MANAGEMENT_PORT=${SCHEMA_REGISTRY_MANAGEMENT_PORT:-9081}
SCHEMA_REGISTRY_TIMEOUT=${SCHEMA_REGISTRY_TIMEOUT:-120}
SCHEMA_REGISTRY_HEAP_OPTS=${SCHEMA_REGISTRY_HEAP_OPTS:--Xms128m -Xmx512m}
APICURIO_VERSION=${APICURIO_VERSION:-2.6.13.Final}
CCOMPAT_PATH=/apis/ccompat/v7

AP_HOME=$STACK_DIR/apicurio-$APICURIO_VERSION
SR_RUN=$STACK_DIR/schema-registry
SR_PIDFILE=$SR_RUN/schema-registry.pid
SR_STATE=$SR_RUN/schema-registry.state # "<port> <version>" of the running one
SR_LOG=$SR_RUN/logs/registry.out
NAME=schema-registry

case $APICURIO_VERSION in
  2.*) JAVA_MIN=17 JAVA_MAX=23 ;;
  *) JAVA_MIN=21 JAVA_MAX=99 ;;
esac

# ---------------------------------------------------------------- output ---
SCRIPT_TAG=registry
# shellcheck source=scripts/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
url() { printf 'http://%s:%s%s\n' "$HOST" "$SCHEMA_REGISTRY_PORT" "$CCOMPAT_PATH"; }

# --------------------------------------------------------------- packages ---
apt_install() { # pkg...: install Debian packages as root, or say how to
  is_root || die "missing Debian package(s) $*: install with: sudo apt-get install -y $*"
  command -v apt-get >/dev/null || die "missing $* and no apt-get on this machine to install it"
  say "installing Debian package(s): $* (apt-get)"
  mkdir -p "$STACK_DIR"
  local log=$STACK_DIR/apt-registry.log
  local -a inst=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@")
  if ! "${inst[@]}" >"$log" 2>&1; then
    say "apt-get install failed; running apt-get update and trying again"
    apt-get update -q >>"$log" 2>&1 || true
    if ! "${inst[@]}" >>"$log" 2>&1; then
      tail_log apt-get "$log"
      die "apt-get install -y $* failed (full log: $log)"
    fi
  fi
}

# ------------------------------------------------------------------- java ---

java_fits() { [ -n "$1" ] && [ "$1" -ge "$JAVA_MIN" ] && [ "$1" -le "$JAVA_MAX" ]; }

java_need() { # for messages
  if [ "$JAVA_MAX" = 99 ]; then printf 'Java >= %s' "$JAVA_MIN"; else printf 'Java %s..%s' "$JAVA_MIN" "$JAVA_MAX"; fi
}

JAVA_HOME_SEL=
find_java() { # sets JAVA_HOME_SEL to a Java that runs Apicurio $APICURIO_VERSION
  [ -n "$JAVA_HOME_SEL" ] && return 0
  local c m seen="" forced=${SCHEMA_REGISTRY_JAVA_HOME:-${STACK_JAVA_HOME:-}}
  if [ -n "$forced" ]; then
    [ -x "$forced/bin/java" ] || die "SCHEMA_REGISTRY_JAVA_HOME/STACK_JAVA_HOME=$forced has no bin/java"
    m=$(java_major "$forced/bin/java")
    java_fits "$m" || die "$forced is Java ${m:-?}; Apicurio Registry $APICURIO_VERSION needs $(java_need)"
    JAVA_HOME_SEL=$forced
    return 0
  fi
  local -a cands=()
  [ -n "${JAVA_HOME:-}" ] && cands+=("$JAVA_HOME")
  if command -v java >/dev/null 2>&1; then
    c=$(readlink -f "$(command -v java)") && cands+=("$(dirname "$(dirname "$c")")")
  fi
  for c in /usr/lib/jvm/*; do [ -d "$c" ] && cands+=("$c"); done
  for c in "${cands[@]}"; do
    [ -x "$c/bin/java" ] || continue
    m=$(java_major "$c/bin/java")
    if java_fits "$m"; then JAVA_HOME_SEL=$c; return 0; fi
    seen="$seen Java ${m:-?} at $c;"
  done
  if [ "$JAVA_MIN" = 17 ] && is_root; then
    say "no Java $JAVA_MIN..$JAVA_MAX found"
    apt_install openjdk-17-jre-headless
    find_java
    return 0
  fi
  if [ "$JAVA_MIN" = 17 ]; then
    die "no Java 17..23 found (${seen:- none}): Apicurio Registry $APICURIO_VERSION needs one. Install it with: sudo apt-get install -y openjdk-17-jre-headless (or set SCHEMA_REGISTRY_JAVA_HOME)"
  fi
  die "no $(java_need) found (${seen:- none}): Apicurio Registry $APICURIO_VERSION needs one and Debian 12 has no package for it; install one and set SCHEMA_REGISTRY_JAVA_HOME, or use APICURIO_VERSION=2.6.13.Final (Java 17)"
}

# -------------------------------------------------------------- processes ---

pid_is_ours() { # pid: an Apicurio started from this $STACK_DIR (its command line or cwd)
  local cmd cwd
  cmd=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || true
  cwd=$(readlink "/proc/$1/cwd" 2>/dev/null) || true
  case "$cmd" in *"$STACK_DIR/apicurio-"*) return 0 ;; esac
  case "$cwd/" in "$SR_RUN/"*) return 0 ;; esac
  return 1
}

sr_ports() {
  case $APICURIO_VERSION in
    2.*) echo "$SCHEMA_REGISTRY_PORT" ;;
    *) echo "$SCHEMA_REGISTRY_PORT $SCHEMA_REGISTRY_MANAGEMENT_PORT" ;;
  esac
}

sr_pid() { # pid of our running registry, from its pid file or else its port
  local pid="" port
  [ -s "$SR_PIDFILE" ] && pid=$(tr -dc '0-9' <"$SR_PIDFILE" 2>/dev/null)
  if pid_alive "$pid" && pid_is_ours "$pid"; then echo "$pid"; return 0; fi
  # pid file lost: a registry of this stack on the port is still ours
  for pid in $(port_pids "$SCHEMA_REGISTRY_PORT"); do
    if pid_alive "$pid" && pid_is_ours "$pid"; then
      (mkdir -p "$SR_RUN" && echo "$pid" >"$SR_PIDFILE") 2>/dev/null || true
      echo "$pid"; return 0
    fi
  done
  return 1
}

sr_answers() { # its Confluent API lists subjects (a JSON array)
  local body
  if command -v curl >/dev/null 2>&1; then
    body=$(curl -s -m 10 "$(url)/subjects" 2>/dev/null) || true
  else
    body=$(timeout 10 bash -c 'exec 3<>/dev/tcp/$0/$1 && printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3 && sed "1,/^\r\?$/d" <&3' \
      "$HOST" "$SCHEMA_REGISTRY_PORT" "$CCOMPAT_PATH/subjects" 2>/dev/null) || true
  fi
  [ "${body:0:1}" = "[" ]
}

# ---------------------------------------------------------------- install ---
sr_install() { # downloads once, unpacks into $AP_HOME
  [ -f "$AP_HOME/.complete" ] && return 0
  local art=io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all
  local dl=$STACK_DIR/downloads t0=$SECONDS log=$STACK_DIR/mvn-registry.log
  say "$NAME: fetching Apicurio Registry $APICURIO_VERSION from Maven Central (once, ~150 MB) ..."
  need_cmd mvn maven
  mkdir -p "$dl"
  # -f: a project of ours, whatever pom.xml the current directory may hold
  if ! JAVA_HOME=$JAVA_HOME_SEL mvn -B -q -Dstyle.color=never -f "$TEMPLATE_DIR/kafka-pom.xml" \
    dependency:copy -Dartifact="$art" -DoutputDirectory="$dl" >"$log" 2>&1; then
    local line
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -m1 '\[ERROR\]') || line=$(tail -n 5 "$log")
    printf 'mvn: %s\n' "$line" >&2
    die "download of $art from Maven Central refused or failed (mvn's error above; full log: $log)"
  fi
  local tgz=$dl/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz tmp=$STACK_DIR/apicurio-unpack.tmp
  [ -f "$tgz" ] || die "maven ran but $tgz is missing"
  rm -rf "$tmp" "$AP_HOME"; mkdir -p "$tmp"
  tar -xzf "$tgz" -C "$tmp" --no-same-owner || die "could not unpack $tgz"
  [ -f "$tmp/quarkus-run.jar" ] || [ -f "$tmp/apicurio-registry-app-$APICURIO_VERSION-runner.jar" ] ||
    die "$tgz has neither quarkus-run.jar nor apicurio-registry-app-$APICURIO_VERSION-runner.jar"
  mv "$tmp" "$AP_HOME"
  rm -f "$tgz"
  rmdir "$dl" 2>/dev/null || true
  touch "$AP_HOME/.complete"
  say "$NAME: unpacked into $AP_HOME ($((SECONDS - t0))s)"
}

sr_jar() {
  if [ -f "$AP_HOME/quarkus-run.jar" ]; then echo "$AP_HOME/quarkus-run.jar"
  else echo "$AP_HOME/apicurio-registry-app-$APICURIO_VERSION-runner.jar"; fi
}

LAUNCH_PID=
sr_start() {
  mkdir -p "$SR_RUN/logs" "$SR_RUN/tmp"
  rm -f "$SR_PIDFILE"
  printf '%s %s\n' "$SCHEMA_REGISTRY_PORT" "$APICURIO_VERSION" >"$SR_STATE"
  [ -f "$SR_LOG" ] && mv -f "$SR_LOG" "$SR_LOG.prev"
  : >"$SR_LOG"
  local -a mgmt=()
  case $APICURIO_VERSION in
    2.*) ;; # no separate management interface
    *) mgmt=(-Dquarkus.management.host="$HOST" -Dquarkus.management.port="$SCHEMA_REGISTRY_MANAGEMENT_PORT") ;;
  esac
  # cwd = $SR_RUN: whatever it writes by relative path (transaction logs) lands there.
  # shellcheck disable=SC2086 # SCHEMA_REGISTRY_HEAP_OPTS is a list of flags
  nohup setsid env -C "$SR_RUN" bash -c 'echo $$ >"$0"; exec "$@"' "$SR_PIDFILE" \
    "$JAVA_HOME_SEL/bin/java" $SCHEMA_REGISTRY_HEAP_OPTS -XX:+ExitOnOutOfMemoryError \
    -Djava.io.tmpdir="$SR_RUN/tmp" \
    -Djava.util.logging.manager=org.jboss.logmanager.LogManager \
    -Dquarkus.http.host="$HOST" -Dquarkus.http.port="$SCHEMA_REGISTRY_PORT" \
    "${mgmt[@]}" -jar "$(sr_jar)" </dev/null >>"$SR_LOG" 2>&1 9>&- &
  LAUNCH_PID=$!
}

sr_wait() { # since launcher-pid: wait for it to answer, or fail with its log
  local since=$1 launcher=${2:-} pid
  while :; do
    pid=$(sr_pid) || pid=
    if [ -n "$pid" ] && sr_answers; then return 0; fi
    if [ -z "$pid" ] && ! pid_alive "$launcher" && [ $((SECONDS - since)) -ge 3 ]; then
      tail_log "$NAME" "$SR_LOG"
      die "$NAME exited during startup (see its log above)"
    fi
    if [ $((SECONDS - since)) -ge "$SCHEMA_REGISTRY_TIMEOUT" ]; then
      tail_log "$NAME" "$SR_LOG"
      sr_stop >/dev/null 2>&1 || true
      die "$NAME did not answer on $(url) within ${SCHEMA_REGISTRY_TIMEOUT}s (stopped it; log above; raise SCHEMA_REGISTRY_TIMEOUT if the machine is just slow)"
    fi
    sleep 0.5
  done
}

sr_stop() { # our process, then anything of ours still on its ports
  local pid p port foreign=""
  if pid=$(sr_pid); then stop_pid "$NAME" "$pid"; fi
  rm -f "$SR_PIDFILE" "$SR_STATE"
  for port in $(sr_ports); do
    for p in $(port_pids "$port"); do
      if pid_is_ours "$p"; then
        warn "pid $p of this stack still listens on $port: stopping it"
        stop_pid "$NAME" "$p"
      else
        foreign="$foreign port $port: pid $p ($(pid_cmdline "$p"))"
      fi
    done
  done
  [ -z "$foreign" ] || warn "left alone, not started by this script:$foreign"
  return 0
}

# --------------------------------------------------------------- commands ---
lock() { # one up/down at a time per $STACK_DIR
  mkdir -p "$STACK_DIR"
  exec 9>"$STACK_DIR/.registry.lock"
  if command -v flock >/dev/null 2>&1 && ! flock -w 600 9; then
    die "another scripts/registry.sh holds $STACK_DIR/.registry.lock"
  fi
}

row() { printf '%-16s %-22s %s\n' "$NAME" "$HOST:$SCHEMA_REGISTRY_PORT" "$1"; }

running_elsewhere() { # pid: our registry runs, but not on this port or not this version
  local st
  st=$(cat "$SR_STATE" 2>/dev/null) || st=
  [ -n "$st" ] && [ "$st" != "$SCHEMA_REGISTRY_PORT $APICURIO_VERSION" ] || return 1
  printf 'the registry of %s (pid %s) runs on port %s as Apicurio Registry %s, not on port %s as %s' \
    "$STACK_DIR" "$1" "${st%% *}" "${st#* }" "$SCHEMA_REGISTRY_PORT" "$APICURIO_VERSION"
}

cmd_up() {
  local t0=$SECONDS pid port other
  lock
  if pid=$(sr_pid); then
    if other=$(running_elsewhere "$pid"); then
      die "$other: run scripts/registry.sh down first (it stops whatever this checkout's registry is)"
    fi
    sr_wait "$SECONDS"
    row "up (pid $pid, was already running) $(url)"
    return 0
  fi
  # fail fast, before any download: Java, then ports
  find_java
  for port in $(sr_ports); do
    if port_open "$port" || [ -n "$(port_pids "$port")" ]; then
      die "$NAME cannot start: port $port is already taken by$(describe_port "$port"). Stop that process or pick another port (SCHEMA_REGISTRY_PORT, SCHEMA_REGISTRY_MANAGEMENT_PORT)"
    fi
  done
  sr_install
  local since=$SECONDS
  sr_start
  sr_wait "$since" "$LAUNCH_PID"
  pid=$(sr_pid) || pid='?'
  row "up (pid $pid, started) $(url)"
  say "Apicurio Registry $APICURIO_VERSION (Java $(java_major "$JAVA_HOME_SEL/bin/java")) up in $((SECONDS - t0))s (log: $SR_LOG)"
}

cmd_down() {
  local t0=$SECONDS
  lock
  sr_stop
  row "down"
  say "$NAME down in $((SECONDS - t0))s"
}

cmd_status() {
  local pid other
  if pid=$(sr_pid); then
    if other=$(running_elsewhere "$pid"); then row "down: $other"; return 1; fi
    if sr_answers; then row "up (pid $pid) $(url)"; return 0; fi
    row "down: running (pid $pid) but not answering yet"; return 1
  fi
  if port_open "$SCHEMA_REGISTRY_PORT"; then
    row "down; port $SCHEMA_REGISTRY_PORT is held by another process:$(describe_port "$SCHEMA_REGISTRY_PORT")"
  else
    row "down"
  fi
  return 1
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit "${1:-2}"
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  url) url ;;
  -h | --help | help) usage 0 ;;
  *) usage 2 ;;
esac
