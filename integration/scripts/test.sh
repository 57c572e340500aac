#!/usr/bin/env bash
# The project's test command (the README names it; CI runs it through .ci/run): sets up the machine, checks
# formatting and lints, then runs every test — unit tests and the end-to-end tests against the real control
# plane and registries. Cargo's build output is cached outside the checkout so that a warm run is fast.
set -euo pipefail
cd "$(dirname "$0")/../.."
integration/scripts/setup.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/nodelet-test/target}
# A fresh clone rebuilds the workspace's crates anyway; incremental data would only fill the disk the tests'
# nodes measure.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
# The privileged runtime and cgroup tests once more on the production hosts' layout: a pure cgroup v2 kernel in
# a throwaway QEMU guest (this machine is hybrid), each test binary run by the guest through cargo's runner hook.
export CGV2_CACHE=${CGV2_CACHE:-${NODELET_TEST_CACHE:-/var/cache/nodelet-test}/cgv2-vm}
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/integration/scripts/cgv2-vm.sh run --timeout 1200 --"
cargo test -p nodelet-runtime --test containers
cargo test -p nodelet-cgroups --test oom_events --test psi_trigger --test control --test hierarchy -- --color never
