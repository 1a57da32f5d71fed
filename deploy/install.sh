#!/usr/bin/env bash
# Installs gatekey binaries and systemd units on this host (run as root from
# the repository after `cargo build --release -p gatekey`).
#   deploy/install.sh server          control plane
#   deploy/install.sh hub|gateway|spoke   an agent; then edit /etc/gatekey/<role>.yaml
set -euo pipefail
role=${1:?usage: deploy/install.sh server|gateway|hub|spoke}
cd "$(dirname "$0")/.."
id gatekey >/dev/null 2>&1 || useradd --system --home-dir /var/lib/gatekey --shell /usr/sbin/nologin gatekey
install -d -m 0755 /etc/gatekey
case "$role" in
  server)
    install -m 0755 target/release/gatekey-server target/release/gatekey-admin /usr/local/bin/
    [ -f /etc/gatekey/server.yaml ] || install -m 0644 deploy/config/server.yaml /etc/gatekey/server.yaml
    install -m 0644 deploy/systemd/gatekey-server.service /etc/systemd/system/
    systemctl daemon-reload && systemctl enable --now gatekey-server
    ;;
  gateway|hub|spoke)
    install -m 0755 target/release/gatekey-agent /usr/local/bin/
    [ -f "/etc/gatekey/$role.yaml" ] || install -m 0640 -g gatekey "deploy/config/$role.yaml" "/etc/gatekey/$role.yaml"
    install -m 0644 "deploy/systemd/gatekey-$role.service" /etc/systemd/system/
    systemctl daemon-reload
    echo "edit /etc/gatekey/$role.yaml (name, control_plane_url, token), then: systemctl enable --now gatekey-$role"
    ;;
  *) echo "unknown role $role" >&2; exit 2 ;;
esac
