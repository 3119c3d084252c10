#!/usr/bin/env bash
# Data plane: one download, new-flow latency and concurrent flows through proxyfleet's SOCKS5 and HTTP CONNECT
# doors, side by side with going direct and with the peer stack (microsocks behind a rathole reverse tunnel), plus
# the cost of a cached credential check.
# Usage: bench/proxy.sh    (settings in the environment; see bench/README.md, "Data plane (proxies)")
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p proxyfleet-server -p proxyfleet-agent

# The peer stack's tools live outside the repo. Without them the benchmark still runs and says why the peer is
# missing.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
if [ -z "${MICROSOCKS_BIN:-}" ] && ! command -v microsocks >/dev/null 2>&1; then
  echo "bench: installing microsocks (apt-get)" >&2
  as_root apt-get install -y -q microsocks >&2 \
    || { as_root apt-get update -q >&2 && as_root apt-get install -y -q microsocks >&2; } \
    || echo "bench: could not install microsocks; the peer stack will be skipped" >&2
fi
# socat runs the reference ceilings (two plain or TLS hops); without it they are left out.
if [ -z "${SOCAT_BIN:-}" ] && ! command -v socat >/dev/null 2>&1; then
  echo "bench: installing socat (apt-get)" >&2
  as_root apt-get install -y -q socat >&2 \
    || { as_root apt-get update -q >&2 && as_root apt-get install -y -q socat >&2; } \
    || echo "bench: could not install socat; the reference ceilings will be skipped" >&2
fi
if [ -z "${RATHOLE_BIN:-}" ] && ! command -v rathole >/dev/null 2>&1; then
  cache="$HOME/.cache/proxyfleet-bench"
  if [ ! -x "$cache/bin/rathole" ]; then
    # Without --locked: rathole's shipped lockfile no longer builds.
    echo "bench: installing rathole into $cache (once; takes a few minutes)" >&2
    cargo install -q rathole --root "$cache" >&2 \
      || echo "bench: could not install rathole; the peer stack will be skipped" >&2
  fi
  if [ -x "$cache/bin/rathole" ]; then export RATHOLE_BIN="$cache/bin/rathole"; fi
fi

# The benchmark starts and stops the peer stack itself; this only catches an interrupted run.
peer_script="${BENCH_PEER_SCRIPT:-$PWD/../shared/bench/peer-rathole.sh}"
export BENCH_PEER_SCRIPT="$peer_script"
if [ -z "${PEER_STATE_DIR:-}" ]; then
  PEER_STATE_DIR="$(mktemp -d)"
  export PEER_STATE_DIR
  trap '[ -f "$peer_script" ] && bash "$peer_script" stop >/dev/null 2>&1; rm -rf "$PEER_STATE_DIR"' EXIT
fi

cargo bench -q -p proxyfleet-server --bench proxy
