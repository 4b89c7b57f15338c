#!/usr/bin/env bash
# The one test command (CI runs exactly this via .ci/run): starts the shared broker, then the
# format check, clippy with warnings denied, a build of every binary (the end-to-end tests spawn
# target/debug/comatching-relay and friends), and the whole workspace test suite. CI reads the
# closing lines of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "broker"
scripts/broker.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace --bins"
cargo build --workspace --bins

# ---------------------------------------------------------------------------------------------
# Further checks (e.g. nix: flake parse/eval, deadnix) go HERE, before the test suite, so that
# the closing lines of this script stay those of `cargo test`.
# ---------------------------------------------------------------------------------------------

step "nix checks (parse, deadnix, evaluation tests)"
scripts/nix-check.sh

step "cargo test --workspace"
cargo test --workspace
