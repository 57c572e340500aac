#!/usr/bin/env bash
# Builds the upstream control plane used by the tests from the Go module proxy, cached by version:
#   $NODELET_TEST_CACHE/k8s-<version>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,etcd,agnhost,kubeadm}
# All static (CGO_ENABLED=0, as upstream ships them): agnhost goes into a test image with no libc, and one build
# configuration lets the six binaries share every compiled package.
# A warm run (all four binaries present) returns at once. Go's own module and build caches live under the same
# cache dir (GOMODCACHE/GOCACHE), so a rebuild after a version bump only compiles what changed.
set -euo pipefail
VERSION=${K8S_VERSION:-v1.37.2}
CACHE=${NODELET_TEST_CACHE:-/var/cache/nodelet-test}
OUT=$CACHE/k8s-$VERSION
BIN=$OUT/bin
want=(kube-apiserver kube-controller-manager kube-scheduler etcd agnhost kubeadm)

have_all() { for b in "${want[@]}"; do [ -x "$BIN/$b" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/build} GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
mkdir -p "$OUT/src/etcd" "$BIN"
cd "$OUT/src"
minor=${VERSION#v1.}; minor=${minor%%.*}
# k8s.io/kubernetes requires its staging repos at v0.0.0; they are published as v0.<minor>.<patch>.
gomod=$(go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
{
  echo "module nodelet.test/controlplane"
  echo "go $(awk '$1=="go"{print $2; exit}' "$gomod")"
  echo "require k8s.io/kubernetes $VERSION"
  awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u |
    while read -r m; do echo "replace $m => $m v0.${VERSION#v1.}"; done
} > go.mod
# etcd: the server version k8s.io/kubernetes itself depends on, behind a two-line main.
cat > etcd/main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
ldflags="-s -w"
for kv in gitVersion=$VERSION gitMajor=1 gitMinor=$minor gitTreeState=clean; do
  ldflags+=" -X k8s.io/component-base/version.$kv"
done
echo "building control plane $VERSION into $BIN (cold: ~20-30 min on 2 cores)" >&2
go build -trimpath -ldflags "$ldflags" -o "$BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/test/images/agnhost ./etcd
have_all || { echo "control-plane build did not produce all of: ${want[*]}" >&2; exit 1; }
echo "$BIN"
