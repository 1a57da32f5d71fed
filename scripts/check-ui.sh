#!/usr/bin/env bash
# The web console: type-checks web/ and rebuilds its bundle into a temporary
# directory; the bundle committed under crates/gatekey-server/ui (which the
# server embeds) must be exactly what the sources build. After changing
# web/src, run `npm run build` in web/ and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d web/node_modules ]; then
  echo "check-ui: web/node_modules is missing: run scripts/setup.sh (or npm install in web/)" >&2
  exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd web && node_modules/.bin/tsc --noEmit -p . && node build.mjs --outdir "$out" >/dev/null)
if ! diff -r "$out" crates/gatekey-server/ui >/dev/null; then
  echo "check-ui: crates/gatekey-server/ui is stale: run (cd web && npm run build) and commit it" >&2
  diff -r --brief "$out" crates/gatekey-server/ui >&2 || true
  exit 1
fi
echo "ui: type check passed; the committed bundle matches web/src"
