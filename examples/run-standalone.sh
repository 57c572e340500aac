#!/usr/bin/env bash
# The README's "run" command: a standalone node (no API server) running the static pods of examples/pods.
# Installs what it needs (Debian packages), builds a busybox OCI image with umoci (no registry, no daemon),
# imports it into nodelet's store as nodelet.local/busybox:latest, builds nodelet and runs it. Root.
#   examples/run-standalone.sh [nodelet flags...]      then, in another shell:  nodelet ps ; nodelet logs hello
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(umoci busybox-static libseccomp-dev pkg-config containernetworking-plugins iptables)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
cache=${NODELET_EXAMPLE_CACHE:-/var/cache/nodelet-example}
layout=$cache/oci
if [ ! -f "$layout/index.json" ]; then
  . integration/scripts/busybox-rootfs.sh
  rm -rf "$cache"; mkdir -p "$cache"
  umoci init --layout "$layout"
  umoci new --image "$layout:busybox"
  umoci unpack --image "$layout:busybox" "$cache/bundle"
  busybox_rootfs "$cache/bundle/rootfs"
  umoci repack --image "$layout:busybox" "$cache/bundle"
  umoci config --image "$layout:busybox" --os linux --architecture amd64 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --config.cmd sh
  rm -rf "$cache/bundle"
fi
cargo build --release -p nodelet
bin=${CARGO_TARGET_DIR:-target}/release/nodelet
root=${NODELET_ROOT_DIR:-/var/lib/nodelet}
"$bin" image import --root-dir "$root" "$layout" --tag busybox nodelet.local/busybox:latest
exec "$bin" --root-dir "$root" --pod-manifest-path examples/pods "$@"
