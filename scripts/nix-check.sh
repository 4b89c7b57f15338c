#!/usr/bin/env bash
# The Nix checks that can run without nixpkgs (which this machine cannot fetch):
#   1. `nix-instantiate --parse` on every tracked-or-new .nix file of the tree;
#   2. `deadnix --fail` on the same files (unused bindings and arguments);
#   3. the evaluation tests nix/tests/*.nix (plain Nix, builtins only), each evaluated with
#      `nix-instantiate --eval --strict`; a failing case throws, which fails the check. Some
#      evaluate the real module files with the stand-ins of nix/tests/stubs/;
#   4. the shell scripts of the image and modules against fake trees (nix/tests/scripts.sh).
# Installs what is missing: `nix-bin` and `jq` from Debian packages, `deadnix` with cargo.
# Prints `nix-check: N passed, M failed` last and exits non-zero when M > 0.
#
# Called by scripts/test.sh; runs standalone too: scripts/nix-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

log() { echo "nix-check: $*" >&2; }

# No daemon, no substituters (nothing is fetched: the checks need no store paths), no build
# users (root uses the store directly), and no network retries.
export NIX_CONFIG=$'substituters =\nbuild-users-group =\nconnect-timeout = 1\nwarn-dirty = false'
export PATH="$HOME/.cargo/bin:$PATH"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v nix-instantiate >/dev/null 2>&1; then
    log "installing nix-bin from Debian packages"
    as_root apt-get update >&2 || { log "apt-get update failed"; exit 1; }
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends nix-bin >&2 \
        || { log "installing nix-bin failed"; exit 1; }
    command -v nix-instantiate >/dev/null 2>&1 || { log "nix-bin installed but no nix-instantiate"; exit 1; }
fi
if ! command -v jq >/dev/null 2>&1; then
    log "installing jq from Debian packages"
    as_root apt-get update >&2 || { log "apt-get update failed"; exit 1; }
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends jq >&2 \
        || { log "installing jq failed"; exit 1; }
fi
if ! command -v deadnix >/dev/null 2>&1; then
    log "installing deadnix with cargo (about 1.5 min)"
    cargo install deadnix --locked >&2 || { log "cargo install deadnix failed"; exit 1; }
    command -v deadnix >/dev/null 2>&1 || { log "deadnix installed but not on PATH"; exit 1; }
fi

passed=0
failed=0
pass() { passed=$((passed + 1)); }
fail() { failed=$((failed + 1)); log "FAILED: $*"; }

# Every .nix file in the working tree that git knows or would add (so new files are checked
# before they are committed), without build outputs or vendored trees.
list_nix_files() {
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files --cached --others --exclude-standard -- '*.nix'
    else
        find . -name '*.nix' -not -path './target*' -not -path '*/.git/*' | sed 's|^\./||'
    fi
}
mapfile -t files < <(list_nix_files | sort -u | while read -r f; do [ -f "$f" ] && echo "$f"; done)
if [ "${#files[@]}" -eq 0 ]; then
    fail "no .nix files found"
fi

log "parse: ${#files[@]} files"
for f in "${files[@]}"; do
    if out=$(nix-instantiate --parse "$f" 2>&1 >/dev/null); then
        pass
    else
        fail "parse $f"
        printf '%s\n' "$out" >&2
    fi
done

log "deadnix --fail"
if NO_COLOR=1 deadnix --fail -- "${files[@]}" >&2; then
    pass
else
    fail "deadnix"
fi

shopt -s nullglob
for t in nix/tests/*.nix; do
    [ "$(basename "$t")" = harness.nix ] && continue
    name=$(basename "$t" .nix)
    if out=$(nix-instantiate --eval --strict --json "$t" 2>&1); then
        # The harness returns the list of case names; names contain no commas or quotes.
        n=$(printf '%s' "$out" | tr -d '[]' | tr ',' '\n' | grep -c '"')
        if [ "$n" -gt 0 ]; then
            passed=$((passed + n))
            log "eval $name: $n cases passed"
        else
            fail "eval $name: no cases ($out)"
        fi
    else
        fail "eval $name"
        printf '%s\n' "$out" >&2
    fi
done

log "shell scripts"
if out=$(bash nix/tests/scripts.sh 2>&1); then
    passed=$((passed + $(printf '%s\n' "$out" | grep -c '^ok ')))
else
    fail "shell scripts"
    printf '%s\n' "$out" | grep -v '^ok ' >&2
fi

echo "nix-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
