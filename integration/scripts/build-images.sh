#!/usr/bin/env bash
# Builds the test images without a daemon and pushes them once into a docker-registry storage directory:
#   $NODELET_TEST_CACHE/images/<inputs-hash>/{registry/,images.json}, and images/current -> that directory.
# Inputs: this script, the busybox-static package version and the agnhost binary; unchanged inputs => no rebuild.
#
# Images (repository:tag — what it exercises):
#   busybox:latest          OCI manifest, one layer (busybox-static + applet links + /etc/passwd,group)
#   busybox-docker:latest   the same content as a Docker schema2 manifest
#   multiarch:latest        OCI index: linux/amd64 (busybox + /platform) and linux/arm64 (marker layer only)
#   agnhost:<version>       busybox layer + agnhost layer, entrypoint /agnhost (the upstream e2e workhorse)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../versions.env"
CACHE=${NODELET_TEST_CACHE:-/var/cache/nodelet-test}
AGNHOST=$CACHE/k8s-$K8S_VERSION/bin/agnhost
[ -x "$AGNHOST" ] || { echo "build-images: $AGNHOST missing (run build-control-plane.sh first)" >&2; exit 1; }
# Tag agnhost as upstream does, with the version in its source tree (in the Go module cache build-control-plane.sh used).
AGNHOST_VERSION=$(cat "${GOMODCACHE:-$CACHE/go/mod}/k8s.io/kubernetes@$K8S_VERSION/test/images/agnhost/VERSION")

hash=$( { cat "$0" "$here/busybox-rootfs.sh"; dpkg-query -W -f='${Version}' busybox-static; sha256sum < "$AGNHOST"; echo "$AGNHOST_VERSION"; } |
  sha256sum | cut -c1-16)
OUT=$CACHE/images/$hash
if [ -f "$OUT/images.json" ]; then ln -sfn "$OUT" "$CACHE/images/current"; echo "$OUT"; exit 0; fi

work=$(mktemp -d /tmp/nodelet-images.XXXXXX)
reg_pid=
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
oci=$work/oci
umoci init --layout "$oci"

. "$here/busybox-rootfs.sh"

# new_image TAG: an empty image; add_layer TAG DIR: DIR's content as a layer on top (umoci diffs the bundle).
new_image() { umoci new --image "$oci:$1"; }
add_layer() {
  local tag=$1 fill=$2 b=$work/bundle-$1
  rm -rf "$b"; umoci unpack --image "$oci:$tag" "$b"
  "$fill" "$b/rootfs"
  umoci repack --image "$oci:$tag" "$b"
}
config() { local tag=$1; shift; umoci config --image "$oci:$tag" --os linux "$@"; }

new_image busybox; add_layer busybox busybox_rootfs
config busybox --architecture amd64 --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.cmd sh

umoci config --image "$oci:busybox" --tag agnhost --config.entrypoint /agnhost --config.cmd ''
# Upstream's agnhost image has user-defined-in-image (1000) in group-defined-in-image (50000): the
# SupplementalGroupsPolicy tests rely on them.
agnhost_layer() {
  cp "$AGNHOST" "$1/agnhost"
  echo 'user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh' >> "$1/etc/passwd"
  printf 'user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' >> "$1/etc/group"
}
add_layer agnhost agnhost_layer

amd64_marker() { busybox_rootfs "$1"; echo linux/amd64 > "$1/platform"; }
arm64_marker() { echo linux/arm64 > "$1/platform"; }
new_image multiarch-amd64; add_layer multiarch-amd64 amd64_marker; config multiarch-amd64 --architecture amd64 --config.cmd sh
new_image multiarch-arm64; add_layer multiarch-arm64 arm64_marker; config multiarch-arm64 --architecture arm64 --config.cmd sh

# An OCI index of the two platform manifests, tagged `multiarch` in the layout.
desc() {  # descriptor of tag $1 in the layout, with platform $2/$3
  jq -c --arg t "$1" --arg os "$2" --arg arch "$3" '.manifests[]
    | select(.annotations["org.opencontainers.image.ref.name"] == $t)
    | {mediaType, digest, size, platform: {os: $os, architecture: $arch}}' "$oci/index.json"
}
index=$(jq -cn --argjson a "$(desc multiarch-amd64 linux amd64)" --argjson b "$(desc multiarch-arm64 linux arm64)" \
  '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: [$a, $b]}')
digest=$(printf '%s' "$index" | sha256sum | cut -d' ' -f1)
printf '%s' "$index" > "$oci/blobs/sha256/$digest"
jq --arg d "sha256:$digest" --argjson s "${#index}" '.manifests += [{mediaType: "application/vnd.oci.image.index.v1+json",
  digest: $d, size: $s, annotations: {"org.opencontainers.image.ref.name": "multiarch"}}]' "$oci/index.json" > "$work/index.json"
mv "$work/index.json" "$oci/index.json"

# Push everything into a registry whose storage becomes the cached store.
mkdir -p "$CACHE/images"; rm -rf "$OUT.tmp"; mkdir -p "$OUT.tmp/registry"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $OUT.tmp/registry}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 & reg_pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export REGISTRY_AUTH_FILE=$work/auth.json   # keep skopeo away from any user config
push() {  # push SRC_TAG NAME TAG [skopeo flags...]
  local src=$1 name=$2 tag=$3; shift 3
  skopeo copy -q --dest-tls-verify=false "$@" "oci:$oci:$src" "docker://127.0.0.1:$port/$name:$tag"
  # The manifest's bytes as served (in a file: $(...) would drop a trailing newline and change the digest).
  skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/$name:$tag" > "$work/raw"
  jq -cn --arg n "$name" --arg t "$tag" --arg d "sha256:$(sha256sum < "$work/raw" | cut -d' ' -f1)" \
    --arg m "$(jq -r '.mediaType // "application/vnd.oci.image.manifest.v1+json"' "$work/raw")" \
    '{name: $n, tag: $t, mediaType: $m, digest: $d}' >> "$work/images.jsonl"
}
push busybox busybox latest
push busybox busybox-docker latest --format v2s2
push multiarch multiarch latest --all
push agnhost agnhost "$AGNHOST_VERSION"
jq -s . "$work/images.jsonl" > "$OUT.tmp/images.json"
kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; reg_pid=
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
ln -sfn "$OUT" "$CACHE/images/current"
# Stores of earlier inputs are dead weight now.
find "$CACHE/images" -mindepth 1 -maxdepth 1 -type d ! -path "$OUT" -exec rm -rf {} +
echo "$OUT"
