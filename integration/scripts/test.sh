#!/usr/bin/env bash
# The project's test command (the README names it; CI runs it through .ci/run): sets up the machine, checks
# formatting and lints, then runs every test — unit tests and the end-to-end tests against the real control
# plane and registries. Cargo's build output is cached outside the checkout so that a warm run is fast.
set -euo pipefail
cd "$(dirname "$0")/../.."
integration/scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/nodelet-test/target}
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
