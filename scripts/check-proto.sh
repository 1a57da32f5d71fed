#!/usr/bin/env bash
# The agent-link schema: buf lint, buf breaking against the released baseline
# (so a newer server never strands older agents), and the checked-in prost
# code regenerated from it must match.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=tools/buf/node_modules/.bin/buf
(cd proto && "../$buf" lint)
(cd proto && "../$buf" breaking --against baseline/link-v1.binpb)
CARGO_TARGET_DIR=target/protogen cargo run -q --manifest-path tools/protogen/Cargo.toml -- --check
echo "proto: lint, breaking-change and generated-code checks passed"
