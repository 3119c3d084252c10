#!/usr/bin/env bash
# Agent footprint: release binary size and idle RSS of a connected proxyfleet-agent, against a local server.
# Usage: bench/agent-footprint.sh    (builds release binaries; needs curl and python3)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p proxyfleet-server -p proxyfleet-agent
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
api=127.0.0.1:$(port); tunnel=127.0.0.1:$(port)
printf 'Footpr1nt-Check-Phrase\n' | $bin/proxyfleet operator create --username footprint --password-stdin --data-dir "$work/server" >/dev/null
$bin/proxyfleet serve --data-dir "$work/server" --listen "$api" --tunnel-listen "$tunnel" --log-level warn >/dev/null 2>&1 &
for _ in $(seq 100); do curl -sf "http://$api/healthz" >/dev/null && break; sleep 0.1; done
token=$(curl -sf "http://$api/api/v1.0/auth/login" -H 'content-type: application/json' \
  -d '{"username":"footprint","password":"Footpr1nt-Check-Phrase"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
code=$(curl -sf "http://$api/api/v1.0/devices" -H "authorization: Bearer $token" -H 'content-type: application/json' \
  -d '{"name":"footprint"}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["pairing_code"])')
$bin/proxyfleet-agent enroll --server "$tunnel" --code "$code" --state-dir "$work/agent" >/dev/null
$bin/proxyfleet-agent run --state-dir "$work/agent" 2>/dev/null &
agent=$!
sleep 10
size=$(stat -c %s $bin/proxyfleet-agent)
stripped=$(strip -o "$work/stripped" $bin/proxyfleet-agent && stat -c %s "$work/stripped")
rss=$(awk '/VmRSS/ {print $2}' /proc/$agent/status)
printf 'proxyfleet-agent release binary: %.1f MiB (%.1f MiB stripped); idle RSS while connected: %.1f MiB\n' \
  "$(echo "$size/1048576" | bc -l)" "$(echo "$stripped/1048576" | bc -l)" "$(echo "$rss/1024" | bc -l)"
