# shellcheck shell=bash
# Helpers shared by scripts/stack.sh and scripts/registry.sh (sourced, not run).
# The sourcing script sets SCRIPT_TAG (the prefix of its warnings and errors), HOST
# (the address services listen on) and STACK_STOP_TIMEOUT (seconds before KILL).

say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$SCRIPT_TAG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_TAG" "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }
tail_log() { # title file...: the last 30 lines of each existing, non-empty file
  local f
  for f in "${@:2}"; do
    [ -s "$f" ] || continue
    printf -- '----- last 30 lines of %s (%s) -----\n' "$f" "$1" >&2
    tail -n 30 "$f" >&2
  done
  printf -- '-----\n' >&2
}

need_cmd() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  apt_install "$2"
  command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}

java_major() { # java binary -> major version (8 for 1.8), empty if it does not run
  local v
  v=$("$1" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1) || true
  case $v in 1.*) v=${v#1.} ;; esac
  printf '%s' "${v%%[.+-]*}"
}

pid_alive() { # pid: running and not a zombie
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  local st
  st=$(sed -n 's/^[0-9]* (.*) \([A-Z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || true
  [ "$st" != Z ]
}

pid_cmdline() { # pid: its command line, long ones cut in the middle
  local c
  c=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || true
  c=${c% }
  if [ ${#c} -gt 170 ]; then c="${c:0:60} ... ${c: -100}"; fi
  printf '%s' "$c"
}

port_open() { # port: something accepts TCP connections on 127.0.0.1:port
  timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

port_pids() { # port: pids of the processes listening on it (any address)
  local out
  if command -v ss >/dev/null 2>&1; then
    out=$(ss -Htlnp "( sport = :$1 )" 2>/dev/null) || true
    printf '%s\n' "$out" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -un
    return 0
  fi
  # No ss (iproute2): find the listening sockets' inodes in /proc/net.
  local hex inodes p fd
  hex=$(printf '%04X' "$1")
  inodes=$(awk -v h=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == h { print $10 }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null | sort -u)
  [ -n "$inodes" ] || return 0
  for p in /proc/[0-9]*; do
    for fd in "$p"/fd/*; do
      case " ${inodes//$'\n'/ } " in *" $(readlink "$fd" 2>/dev/null | sed -n 's/^socket:\[\([0-9]*\)\]$/\1/p') "*)
        echo "${p#/proc/}"; break ;;
      esac
    done 2>/dev/null
  done | sort -un
}

describe_port() { # port: who holds it, for error messages
  local p out=""
  for p in $(port_pids "$1"); do out="$out${out:+,} pid $p ($(pid_cmdline "$p"))"; done
  printf '%s' "${out:- a process this user cannot see (try: sudo ss -ltnp 'sport = :$1')}"
}

stop_pid() { # name pid: TERM, wait, then KILL
  local name=$1 pid=$2 waited=0
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while pid_alive "$pid"; do
    if [ "$waited" -ge $((STACK_STOP_TIMEOUT * 2)) ]; then
      warn "$name (pid $pid) still running ${STACK_STOP_TIMEOUT}s after TERM: sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.5; waited=$((waited + 1))
  done
  pid_alive "$pid" && die "$name (pid $pid) survived KILL"
  return 0
}
