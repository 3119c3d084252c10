#!/usr/bin/env bash
# The whole test suite: unit tests, store tests on SQLite/PostgreSQL/MariaDB, HTTP and CLI tests, Redis tests.
#
# Services: PostgreSQL, MariaDB and Redis are used at their standard local addresses unless
# PROXYFLEET_TEST_POSTGRES_URL, PROXYFLEET_TEST_MYSQL_URL or PROXYFLEET_TEST_REDIS_URL say otherwise. A test whose
# service is unreachable prints "SKIPPED: <reason>" and passes, unless PROXYFLEET_TEST_REQUIRE_SERVICES=1
# (as in .ci/run), which makes it fail instead. Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --success-output never --failure-output final "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
