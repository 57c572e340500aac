#!/bin/sh
# Installs nodelet as the node's kubelet, the way kubeadm expects one: the binary as `nodelet` with `kubelet`
# linked to it (kubeadm's preflight runs `kubelet --version`), the unit as kubelet.service and kubeadm's drop-in
# in kubelet.service.d/. The test bed runs this too (into a private mount namespace), with:
#   NODELET_BIN   the binary (default /nodelet/vagrant/bin/nodelet)
#   NODELET_DIST  the unit files (default /nodelet/agent/dist)
#   PREFIX        where bin/ goes (default /usr)
#   SYSTEMD_DIR   where the units go (default /etc/systemd/system)
#   NODELET_NO_SYSTEMD=1  skip systemctl (no systemd there)
set -eu
BIN=${NODELET_BIN:-/nodelet/vagrant/bin/nodelet}
DIST=${NODELET_DIST:-/nodelet/agent/dist}
PREFIX=${PREFIX:-/usr}
UNITS=${SYSTEMD_DIR:-/etc/systemd/system}
install -D -m 0755 "$BIN" "$PREFIX/bin/nodelet"
ln -sf nodelet "$PREFIX/bin/kubelet"
mkdir -p "$UNITS/kubelet.service.d"
sed "s|/usr/bin/nodelet|$PREFIX/bin/nodelet|" "$DIST/nodelet.service" > "$UNITS/kubelet.service"
sed "s|/usr/bin/kubelet|$PREFIX/bin/kubelet|" "$DIST/10-kubeadm.conf" > "$UNITS/kubelet.service.d/10-kubeadm.conf"
if [ "${NODELET_NO_SYSTEMD:-}" != 1 ]; then
  systemctl daemon-reload
  systemctl enable kubelet
fi
echo "installed $("$PREFIX/bin/kubelet" --version) as kubelet.service"
