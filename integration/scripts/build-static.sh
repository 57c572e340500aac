#!/usr/bin/env bash
# Builds the release binary as one static executable (glibc and libseccomp linked in), so that the same file
# runs on any x86_64 Linux distribution: the gnu target with crt-static (the musl target is not installed on
# these machines). Prints the binary's path and size.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/nodelet-test/target}
# libseccomp-sys links libseccomp.a instead of the shared library.
export LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=${LIBSECCOMP_LIB_PATH:-/usr/lib/x86_64-linux-gnu}
# With --target, RUSTFLAGS reach the target's crates only, not build scripts and proc macros (which must stay
# dynamic).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p nodelet --target x86_64-unknown-linux-gnu
out=$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/nodelet
if ldd "$out" 2>&1 | grep -q "=>"; then
  echo "$out is dynamically linked:" >&2; ldd "$out" >&2; exit 1
fi
strip -o "$out.stripped" "$out"
echo "$out.stripped: $(du -h "$out.stripped" | cut -f1), static ($(file -b "$out.stripped" | cut -d, -f1-2))"
