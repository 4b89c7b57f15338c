#!/usr/bin/env bash
# Installs what the real-browser tests need (tests/src/browser.rs): Debian's Chromium, its
# chromedriver, and Noto CJK fonts (without them Hangul renders as boxes in the screenshots).
#
# Idempotent: installs only the packages that are missing (dpkg -s), so a machine that has them
# costs nothing. Needs root on a fresh machine. A lock serialises concurrent runs (apt holds its
# own lock and fails rather than waits).
set -euo pipefail

PACKAGES=(chromium chromium-driver fonts-noto-cjk)
LOCK=/run/lock/comatching-browser-install.lock

log() { echo "browser.sh: $*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    log "missing ${missing[*]}; run as root to install them"
    exit 1
fi

mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -w 600 9 || { log "timed out waiting for $LOCK"; exit 1; }

log "installing ${missing[*]} from Debian packages"
apt-get update >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
for bin in /usr/bin/chromedriver /usr/bin/chromium; do
    [ -x "$bin" ] || { log "$bin missing after the install"; exit 1; }
done
