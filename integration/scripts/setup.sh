#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian bookworm machine (as root), and does nothing when warm:
# Debian packages, the upstream control plane built from the Go module proxy, and the test images.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

pkgs=(
  docker-registry apache2-utils                # OCI registry, htpasswd for its basic auth
  umoci skopeo busybox-static jq python3       # daemonless image building
  curl                                         # direct kubelet API requests
  containernetworking-plugins iproute2 iptables  # CNI plugins, test network namespaces
  libseccomp-dev pkg-config                    # libcontainer's seccomp support
  crun runc containerd                         # side-by-side runtime and image-pull benchmarks
  qemu-system-x86                              # the pure cgroup v2 test VM
  vagrant systemd                              # `vagrant validate`, `systemd-analyze verify` of the units
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in go cargo kubectl; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required but not installed" >&2; exit 1; }
done

"$here/build-control-plane.sh" >/dev/null
"$here/build-metrics-server.sh" >/dev/null
"$here/build-images.sh" >/dev/null
# The pure cgroup v2 test VM (kernel from Debian's archive, busybox initramfs), rebuilt when its script changes.
export CGV2_CACHE=${CGV2_CACHE:-${NODELET_TEST_CACHE:-/var/cache/nodelet-test}/cgv2-vm}
stamp=$(sha256sum < "$here/cgv2-vm.sh" | cut -c1-16)
if [ "$(cat "$CGV2_CACHE/stamp" 2>/dev/null)" != "$stamp" ]; then
  # It downloads Debian's current kernel package: the package lists must know it.
  apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-[0-9]' || apt-get update -qq
  "$here/cgv2-vm.sh" setup >/dev/null && echo "$stamp" > "$CGV2_CACHE/stamp"
fi
echo "setup: ok" >&2
