#!/usr/bin/env bash
# The OpenVPN door's benchmark: one TCP flow's throughput (iperf3, both directions) through proxyfleet's door and
# through the same OpenVPN server with plain kernel forwarding/NAT, and the time from client start to first byte.
# Needs root (network namespaces); installs openvpn, nftables, iproute2 and iperf3 if they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
if ! command -v iperf3 >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null
fi
exec cargo bench -p proxyfleet-server --bench openvpn "$@"
