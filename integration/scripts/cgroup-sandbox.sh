#!/bin/sh
# cgroup-sandbox.sh — run a command in a private mount namespace in which every cgroup hierarchy root is a
# child cgroup that this script creates, so that code which writes absolute cgroup paths (libcontainer, runc,
# crun, nodelet's --cgroup-root=/...) lands inside a sandbox on a hybrid host instead of the real roots.
#
#   cgroup-sandbox.sh run NAME -- CMD ARGS...   # creates the children named NAME (if missing), runs CMD inside
#   cgroup-sandbox.sh clean NAME                # removes NAME's cgroup trees (bottom-up; fails if still populated)
#
# The mount namespace outlives CMD (it is kept at /run/nodelet-sandbox/NAME.mnt until `clean`), and a second
# `run` with the same NAME joins it: like an agent on a host, a restarted CMD finds the mounts its previous
# process made (volume tmpfs, rootfs overlays) instead of a fresh namespace without them.
#
# Where each hierarchy root comes from (bind mounts exist only inside the private namespace):
#   memory  -> /sys/fs/cgroup/memory/<the caller's memory cgroup>/NAME  (the caller is not at / there)
#   others  -> /sys/fs/cgroup/<ctrl>/NAME                                (the caller is at / there)
#   unified -> /sys/fs/cgroup/unified/NAME (its cgroup.controllers is empty: crun then accepts the hybrid host);
#              CMD starts in it, so that its own unified cgroup is inside the mounted tree (nodelet's runtime
#              writes its zygote's PID there to start the RCU grace period of a container's cgroup moves early)
# On a pure cgroup v2 host (/sys/fs/cgroup is cgroup2) only the unified root is swapped.
#
# With CGROUP_SANDBOX_ONLY_ROOTS=1 (a new namespace only) the host's own hierarchy mounts are detached inside the
# namespace, so /proc/self/mountinfo lists the sandbox's roots alone: runc (v1) takes the first mount of each
# controller it finds there to bind into a container, and would otherwise pick the host's (whose root is /) and
# look for the container's cgroup at a path that does not exist in the namespace. Nothing changes outside it.
set -eu
cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || { echo "usage: $0 run NAME -- CMD... | clean NAME" >&2; exit 2; }

roots() {  # prints "mountpoint source" pairs
  if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    mine=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
    echo "/sys/fs/cgroup /sys/fs/cgroup${mine%/}/$name"; return
  fi
  memcg=$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
  for d in /sys/fs/cgroup/*/; do
    c=$(basename "$d")
    mountpoint -q "$d" || continue
    if [ "$c" = memory ]; then echo "$d /sys/fs/cgroup/memory${memcg%/}/$name"; else echo "$d ${d%/}/$name"; fi
  done
}

case $cmd in
run)
  shift 2; [ "${1:-}" = -- ] && shift
  if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
    # Make the controllers available to the sandbox root (possible where the parent holds no processes, or is
    # the root cgroup, as in the test VM; elsewhere they must already be enabled).
    mine=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
    parent=/sys/fs/cgroup${mine%/}
    for c in $(cat "$parent/cgroup.controllers"); do echo "+$c" > "$parent/cgroup.subtree_control" 2>/dev/null || true; done
  fi
  roots | while read -r mnt src; do
    mkdir -p "$src"
    case $mnt in */cpuset/)
      [ -s "$src/cpuset.cpus" ] && [ -n "$(cat "$src/cpuset.cpus")" ] || cat "$(dirname "$src")/cpuset.cpus" > "$src/cpuset.cpus"
      [ -n "$(cat "$src/cpuset.mems")" ] || cat "$(dirname "$src")/cpuset.mems" > "$src/cpuset.mems";;
    esac
  done
  map=$(roots | tr '\n' ';')
  if [ "$(stat -f -c %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then
    echo $$ > "/sys/fs/cgroup/unified/$name/cgroup.procs"
  fi
  nsdir=/run/nodelet-sandbox; nsfile=$nsdir/$name.mnt
  if [ -e "$nsfile" ] && nsenter --mount="$nsfile" true 2>/dev/null; then
    exec nsenter --mount="$nsfile" -- "$@"
  fi
  # A namespace file can only be bind-mounted onto a mount with private propagation (as `ip netns` does).
  mkdir -p "$nsdir"
  mountpoint -q "$nsdir" || mount --bind "$nsdir" "$nsdir"
  mount --make-private "$nsdir"
  touch "$nsfile"
  staging=$nsdir/$name.roots; mkdir -p "$staging"
  exec unshare --mount="$nsfile" --propagation private -- sh -c '
    only=$2; staging=$3; i=0
    [ "$only" = 1 ] && mount -t tmpfs -o size=1m cgroup-sandbox-roots "$staging"
    IFS=";"; for pair in $1; do [ -n "$pair" ] || continue; IFS=" " read -r mnt src <<EOF
$pair
EOF
      if [ "$only" = 1 ]; then
        # Bound aside first, the host mount detached (here only), then the sandbox root moved into its place.
        i=$((i + 1)); mkdir "$staging/$i"; mount --bind "$src" "$staging/$i"
        umount -l "$mnt"; mount --move "$staging/$i" "$mnt"
      else
        mount --bind "$src" "$mnt"
      fi
      IFS=";"; done; unset IFS; shift 3; exec "$@"' cgroup-sandbox "$map" "${CGROUP_SANDBOX_ONLY_ROOTS:-0}" "$staging" "$@";;
clean)
  nsfile=/run/nodelet-sandbox/$name.mnt
  if [ -e "$nsfile" ]; then umount "$nsfile" 2>/dev/null || true; rm -f "$nsfile"; fi
  rmdir "/run/nodelet-sandbox/$name.roots" 2>/dev/null || true
  roots | while read -r mnt src; do
    if [ -d "$src" ]; then find "$src" -depth -type d -exec rmdir {} \; 2>/dev/null || true; fi
    if [ -d "$src" ]; then echo "still present (populated?): $src" >&2; fi
  done
  # Exit status says whether everything is gone (the loop runs in a subshell, so check again here).
  roots | while read -r _ src; do [ ! -d "$src" ] || exit 1; done;;
*) echo "usage: $0 run NAME -- CMD... | clean NAME" >&2; exit 2;;
esac
