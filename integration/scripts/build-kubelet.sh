#!/usr/bin/env bash
# Builds the upstream kubelet (same version and module setup as the control plane) for the side-by-side
# pod-startup benchmark: $NODELET_TEST_CACHE/k8s-<version>/bin/kubelet. Not needed by the tests. Warm: returns
# at once; cold: a few minutes on top of the control plane (most packages are shared and already compiled).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=$("$here/build-control-plane.sh")
[ -x "$BIN/kubelet" ] && { echo "$BIN/kubelet"; exit 0; }
VERSION=${K8S_VERSION:-v1.37.2}
CACHE=${NODELET_TEST_CACHE:-/var/cache/nodelet-test}
export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/build} GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
cd "$BIN/../src"
minor=${VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for kv in gitVersion=$VERSION gitMajor=1 gitMinor=$minor gitTreeState=clean; do
  ldflags+=" -X k8s.io/component-base/version.$kv"
done
echo "building kubelet $VERSION into $BIN" >&2
go build -trimpath -ldflags "$ldflags" -o "$BIN/" k8s.io/kubernetes/cmd/kubelet
echo "$BIN/kubelet"
