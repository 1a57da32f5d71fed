#!/usr/bin/env bash
# Builds gatekey and starts a whole installation on its embedded defaults:
# a control plane (SQLite, self-signed TLS) on 127.0.0.1:8443 and a local
# agent "hub-1" with sessions enabled. State lives in ./.gatekey; Ctrl-C stops
# both. Set GATEKEY_PORT to use another port.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
port=${GATEKEY_PORT:-8443}
state=$root/.gatekey
bin=$root/target/release

echo "building gatekey (release)…"
cargo build --release --locked -q -p gatekey --bins

mkdir -p "$state"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping gatekey…"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "port $port is in use: stop what uses it or run GATEKEY_PORT=9443 $0" >&2
  exit 1
fi

"$bin/gatekey-server" --listen "127.0.0.1:$port" --data-dir "$state/server" >"$state/server.out" 2>"$state/server.log" &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q "listening on" "$state/server.out" 2>/dev/null && [ -s "$state/server/admin-token" ] && break
  kill -0 "${pids[0]}" 2>/dev/null || { echo "the control plane failed to start:"; cat "$state/server.log"; exit 1; }
  sleep 0.1
done

key=$(cat "$state/server/admin-token")
ca=$state/server/tls/ca.pem
server=https://127.0.0.1:$port
"$bin/gatekey-admin" login --server "$server" --api-key "$key" --ca-cert "$ca" >/dev/null

if [ ! -f "$state/hub.yaml" ]; then
  token=$("$bin/gatekey-admin" mesh hub create hub-1 -o json | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
  cat >"$state/hub.yaml" <<YAML
# a local agent for trying gatekey (the documented /etc/gatekey/hub.yaml, plus ca_cert)
name: hub-1
control_plane_url: $server
token: $token
ca_cert: $ca

session_enabled: true
YAML
  chmod 600 "$state/hub.yaml"
fi

"$bin/gatekey-agent" --config "$state/hub.yaml" 2>"$state/agent.log" &
pids+=($!)
for _ in $(seq 1 100); do
  "$bin/gatekey-admin" session list 2>/dev/null | grep -q hub-1 && break
  sleep 0.1
done

cat <<MSG

gatekey is running: control plane $server, agent hub-1 (logs in .gatekey/).

  admin API key   $key
  CA certificate  $ca
  CLI settings    saved by 'gatekey-admin login' to ~/.config/gatekey/admin.yaml
  web console     $server/  (sign in with the admin API key; the certificate
                  is self-signed: trust the CA certificate, or accept it once)

Try, in another terminal:

  export PATH="$bin:\$PATH"
  gatekey-admin session list
  gatekey-admin session exec hub-1 "ip addr"
  gatekey-admin session connect hub-1          # interactive shell; exit or ~. to leave
  gatekey-admin session active
  gatekey-admin session exec hub-1 "uname -a; id"
  echo hello | gatekey-admin session exec hub-1 "tr a-z A-Z"
  gatekey-admin troubleshoot list
  gatekey-admin troubleshoot nc 127.0.0.1 --port $port --location hub:hub-1
  gatekey-admin troubleshoot ping 127.0.0.1 -c 3
  gatekey-admin audit list --action session    # every session is on record
  gatekey-admin audit verify                   # the hash chain is intact
  gatekey-admin user create alice --role operator --scope 'hub:*'
  gatekey-admin apikey create --user alice --name laptop --expires 30d
  gatekey-admin mesh hub list
  gatekey-admin mesh hub update hub-1 --session=false   # then exec is refused

Press Ctrl-C to stop.
MSG
wait
