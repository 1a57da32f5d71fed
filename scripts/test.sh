#!/usr/bin/env bash
# Every check and test gatekey has: formatting, lints, the protocol schema,
# the web console's committed bundle, unit and integration tests (real
# processes, sockets, TLS, database), the web console in headless Chromium,
# and the benchmarks in smoke mode so they cannot rot. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/services.sh

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== protocol schema"
scripts/check-proto.sh
echo "== web console bundle"
scripts/check-ui.sh
echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
echo "== web console in headless Chromium"
# Against the target/debug binaries the cargo tests just built; screenshots
# go to test-artifacts/ui/.
(cd web && node --test --test-reporter=tap tests/) 2>&1 | tee -a "$log"
echo "== benchmark smoke run"
cargo build --release --locked -q -p gatekey
target/release/gatekey-bench smoke

# One closing line for the whole run: the sum of every test binary's result.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^# pass [0-9]+$/ { p += $3 } /^# fail [0-9]+$/ { f += $3 } /^# skipped [0-9]+$/ { s += $3 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
