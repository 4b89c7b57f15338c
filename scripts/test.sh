#!/usr/bin/env bash
# The one test command (CI runs exactly this via .ci/run): starts the shared broker, installs the
# browser the browser tests drive (scripts/browser.sh), then the
# format check, clippy with warnings denied, a build of every binary (the end-to-end tests spawn
# target/debug/comatching-relay and friends), and the whole workspace test suite. CI reads the
# closing lines of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# A run from a clean checkout gains nothing from incremental caches, which only cost disk (CI once
# ran out of space mid-build); set CARGO_INCREMENTAL=1 to keep them while iterating.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n==> %s\n' "$*" >&2; }

step "broker"
scripts/broker.sh

step "browser (chromium, chromedriver, CJK fonts for the browser tests)"
scripts/browser.sh

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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo's own last line is a doc-test run of 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
