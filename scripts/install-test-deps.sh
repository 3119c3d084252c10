#!/usr/bin/env bash
# Installs the programs the test suite drives (Debian packages), if they are missing.
# Needs root (or sudo) only when something has to be installed.
set -euo pipefail

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v kill >/dev/null 2>&1 || need+=(procps)
# The OpenVPN door's tests: the real openvpn (server and client), nftables, iproute2 and ping in network namespaces.
command -v openvpn >/dev/null 2>&1 || need+=(openvpn)
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
# PySocks: the SOCKS5 client library the UDP ASSOCIATE test drives.
/usr/bin/python3 -c 'import socks' >/dev/null 2>&1 || need+=(python3-socks)
# Headless Chromium and its WebDriver: the dashboard's browser tests drive them.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: need root to install: ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-test-deps: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
