#!/usr/bin/env bash
# Installs what building and testing gatekey needs beyond the Rust toolchain,
# only where it is missing: protoc (to check the checked-in protobuf code),
# buf (from the npm registry, to lint the schema and catch breaking changes),
# tmux and Python's websockets (tests drive the CLI and the WebSocket API
# like users do), iproute2 and nftables (network namespaces for the
# troubleshooting tests), Chromium and the web console's npm packages
# (TypeScript, esbuild, xterm.js, playwright-core).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v tmux >/dev/null || need_apt+=(tmux)
/usr/bin/python3 -c 'import websockets' 2>/dev/null || need_apt+=(python3-websockets)
# The troubleshooting tests build namespaces and veth links (ip) and mark a
# port "filtered" with a DROP rule (nft).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v nft >/dev/null || need_apt+=(nftables)
# The web console's tests drive Debian's Chromium headless (Playwright).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
fi

if [ ! -x tools/buf/node_modules/.bin/buf ]; then
  echo "setup: installing buf (npm)"
  # `npm install` (not `npm ci`): the lock pins buf 1.75.0 but some registries
  # lack the other platforms' optional packages, which `npm ci` insists on.
  (cd tools/buf && npm install --no-audit --no-fund --loglevel=error)
fi

if [ ! -d web/node_modules ]; then
  echo "setup: installing the web console's packages (npm)"
  # `npm install`, as for buf: the lock pins esbuild, whose per-platform
  # packages some registries lack for other platforms.
  (cd web && npm install --no-audit --no-fund --loglevel=error)
fi
