#!/usr/bin/env bash
# The README's first command: brings up the whole system locally and shows matches happening.
#
# Installs and starts RabbitMQ when missing (scripts/broker.sh), builds the release binaries,
# then runs `comatching-demo`: a relay and two appliances on a vhost of their own, 2,000
# synthetic students registered through the API, points granted, 200 matches, a summary with
# the URLs — and everything keeps running until Ctrl-C, which stops all of it.
#
# DEMO_USERS and DEMO_MATCHES change the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "demo.sh: cargo is required (https://rustup.rs)" >&2
    exit 1
fi

scripts/broker.sh >/dev/null
echo "building release binaries (the first build takes several minutes)…" >&2
cargo build --release --bins -q
exec target/release/comatching-demo
