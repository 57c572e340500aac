#!/usr/bin/env bash
# Builds upstream's e2e suite (`e2e.test`, the Ginkgo binary the conformance specs live in) from the Go module
# proxy at the test bed's Kubernetes version, next to the control plane, with the one test image binary the
# conformance harness builds an image of (`nnp`, upstream's nonewprivs image: a setuid program that prints its
# effective UID):
#   $NODELET_TEST_CACHE/k8s-<version>/bin/{e2e.test,nnp}
# For agent/tests/conformance.rs, which is run by hand (not by test.sh: the specs take hours). Same module setup
# as build-control-plane.sh (staging repos replaced by their published versions), so the two share Go's caches.
set -euo pipefail
VERSION=${K8S_VERSION:-v1.37.2}
CACHE=${NODELET_TEST_CACHE:-/var/cache/nodelet-test}
BIN=$CACHE/k8s-$VERSION/bin
SRC=$CACHE/k8s-$VERSION/src
if [ -x "$BIN/e2e.test" ] && [ -x "$BIN/nnp" ]; then echo "$BIN/e2e.test"; exit 0; fi
[ -f "$SRC/go.mod" ] || "$(dirname "$0")/build-control-plane.sh" >/dev/null
export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/build} GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
cd "$SRC"
echo "building e2e.test $VERSION into $BIN (cold: ~20 min on 2 cores)" >&2
go test -c -trimpath -o "$BIN/e2e.test" k8s.io/kubernetes/test/e2e
go build -trimpath -o "$BIN/nnp" k8s.io/kubernetes/test/images/nonewprivs
echo "$BIN/e2e.test"
