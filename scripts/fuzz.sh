#!/usr/bin/env bash
# Fuzz every wire-protocol decoder with cargo-fuzz (libFuzzer) for SECONDS each (default 60).
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 lets the stable toolchain build them.
set -euo pipefail
cd "$(dirname "$0")/../crates/proto"
secs=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in $(cargo fuzz list); do
  echo "fuzzing $target for ${secs}s"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs"
done
