#!/usr/bin/env bash
# Mutation testing of the pure cores with cargo-mutants (issue 12). NOT part of scripts/test.sh:
# a full run takes hours on two cores. Each module is mutated one change at a time and the test
# targets that guard it are run; a mutant the tests do not notice is a missing test or an
# equivalent change, and docs/mutants.md lists each survivor with which it is.
#
#   scripts/mutants.sh                 # every module below, results under target/mutants/<name>/
#   scripts/mutants.sh sync ledger     # only these
#   scripts/mutants.sh --export        # write docs/mutants/<name>-after.json from the runs
#   MUTANTS_IN_PLACE=1 ...             # mutate this checkout in place (use a disposable one)
#   MUTANTS_SHARD=0/2 ...              # only shard 0 of 2 (run 1/2 in a second checkout at once);
#                                      # --summary and --export merge a module's shards
#   MUTANTS_RE='on_grown|select.rs:8' ...  # a partial rerun: only the mutants whose name matches;
#                                      # kept apart (<name>.re, docs/mutants/<name>-rerun.json)
#
# Runs niced, one job at a time (the machine is shared). cargo-mutants is installed when missing,
# at the pinned version. Summaries: `scripts/mutants.sh --summary` prints caught/missed/timeout/
# unviable per module from the outcomes.json files.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=27.1.0
OUT=${MUTANTS_OUT:-target/mutants}

if ! cargo mutants --version 2>/dev/null | grep -q " $VERSION"; then
    echo "installing cargo-mutants $VERSION" >&2
    cargo install --locked cargo-mutants --version "$VERSION"
fi

# name | files mutated | package whose tests run | cargo test args | functions not mutated (regex).
# The last field skips the async I/O shells (broker consumers, the RPC round trip): their lib
# target cannot reach them (no broker), so every mutant there is "missed" by construction and
# would cost a build each. They are covered end to end by tests/tests/{sync,matching,idempotency,
# faults}.rs; docs/mutants.md lists them as not run.
# The end-to-end targets (tests/) are not run per mutant: they spawn target/debug/comatching-*,
# which `cargo test` does not rebuild with the mutant in it, so they would test the original.
# The mutations the issue names were checked against them by hand (docs/mutants.md).
# The store's crash test (appliance/tests/crash.rs) is left out per mutant too: it needs the
# appliance binary, so each mutant built the crate three times instead of once (about 60 s a
# mutant instead of 25 with two shards). Its subject, the order of writes and flushes, is not
# something cargo-mutants' operators change; the survivors of the lib run were tried against
# it by hand (docs/mutants.md).
MODULES=(
    "digest|protocol/src/digest.rs|comatching-protocol|--lib"
    "sync|appliance/src/sync.rs|comatching-appliance|--lib"
    "engine|appliance/src/engine/**|comatching-appliance|--lib"
    "store|appliance/src/store/**|comatching-appliance|--lib"
    "ledger|cloud-relay/src/ledger.rs|comatching-relay|--lib"
    "matching|cloud-relay/src/matching.rs|comatching-relay|--lib|Matcher::"
    "control|cloud-relay/src/control.rs|comatching-relay|--lib|ControlConsumer|drop_into_snapshot|publish_all"
)

# The outcome files of a module's run (whole, or its shards) or of its partial rerun
# (MUTANTS_RE), one per line.
outcomes_of() {
    if [ "$2" = rerun ]; then
        compgen -G "$OUT/$1.re/mutants.out/outcomes.json" || true
    else
        compgen -G "$OUT/$1/mutants.out/outcomes.json" || true
        compgen -G "$OUT/$1.shard*/mutants.out/outcomes.json" || true
    fi
}

summary() {
    for m in "${MODULES[@]}"; do
        IFS='|' read -r module _ <<<"$m"
        for kind in run rerun; do
            mapfile -t files < <(outcomes_of "$module" "$kind")
            [ ${#files[@]} -gt 0 ] || continue
            name=$module
            [ "$kind" = run ] || name="$module (rerun)"
            python3 - "$name" "${files[@]}" <<'EOF'
import json, sys
name = sys.argv[1]
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
from mutants_merge import merge
d = merge(sys.argv[2:])
print(f"{name:9} caught {d.get('caught', 0):4}  missed {d.get('missed', 0):4}  "
      f"timeout {d.get('timeout', 0):3}  unviable {d.get('unviable', 0):4}  total {d.get('total_mutants', 0)}")
for o in d.get("outcomes", []):
    if o.get("summary") in ("MissedMutant", "Timeout"):
        s = o["scenario"]["Mutant"]
        print(f"    {o['summary']:12} {s['file']}:{s['span']['start']['line']}: {s['name'] if 'name' in s else s.get('replacement')}")
EOF
        done
    done
}

# The committed form of a run (docs/mutants/<name>-after.json): the counts and one line per
# mutant, without cargo-mutants' logs and timings.
export_runs() {
    for m in "${MODULES[@]}"; do
        IFS='|' read -r name _ <<<"$m"
        for kind in run rerun; do
            mapfile -t files < <(outcomes_of "$name" "$kind")
            [ ${#files[@]} -gt 0 ] || continue
            to="docs/mutants/$name-after.json"
            [ "$kind" = run ] || to="docs/mutants/$name-rerun.json"
            python3 - "$to" "${files[@]}" <<'EOF'
import json, sys
sys.dont_write_bytecode = True
sys.path.insert(0, "scripts")
from mutants_merge import merge
d = merge(sys.argv[2:])
keys = ("total_mutants", "caught", "missed", "timeout", "unviable", "success")
out = {"summary": {k: d.get(k, 0) for k in keys}, "complete": d.get("end_time") is not None,
       "outcomes": []}
for o in d.get("outcomes", []):
    s = o["scenario"]
    if s == "Baseline":
        continue
    out["outcomes"].append({"mutant": s["Mutant"]["name"], "outcome": o["summary"]})
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(sys.argv[1])
EOF
        done
    done
}

if [ "${1:-}" = "--summary" ]; then
    summary
    exit 0
fi
if [ "${1:-}" = "--export" ]; then
    export_runs
    exit 0
fi

wanted=("$@")
for m in "${MODULES[@]}"; do
    IFS='|' read -r name files package args skip <<<"$m"
    if [ ${#wanted[@]} -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$name"; then
        continue
    fi
    # The target selection goes to the build as well as the test run (--cargo-arg): passed after
    # `--` it reaches only `cargo test`, and every mutant would also build the package's other
    # targets (the binary's test harness, other integration tests) for nothing.
    test_args=()
    for a in $args; do test_args+=("--cargo-arg=$a"); done
    pkg_args=(--test-package "$package")
    if [ -n "$skip" ]; then
        pkg_args+=(--exclude-re "$skip")
    fi
    where=(-j 1)
    if [ "${MUTANTS_IN_PLACE:-0}" = 1 ]; then
        # A disposable checkout whose target/ is already built: no copy, no cold build.
        where=(--in-place)
    fi
    out_dir="$OUT/$name"
    if [ -n "${MUTANTS_SHARD:-}" ]; then
        where+=(--shard "$MUTANTS_SHARD")
        out_dir="$OUT/$name.shard${MUTANTS_SHARD%/*}of${MUTANTS_SHARD#*/}"
    fi
    if [ -n "${MUTANTS_RE:-}" ]; then
        where+=(--re "$MUTANTS_RE")
        out_dir="$OUT/$name.re"
    fi
    echo "==> mutants: $name ($files), cargo test $args in $package ${MUTANTS_SHARD:+shard $MUTANTS_SHARD}" >&2
    mkdir -p "$out_dir"
    # The appliance keeps its dev opt-level 2 (an environment override of a dashed package's
    # profile, tried before, never reached rustc). Measured here: a sync mutant ≈ 55-70 s to build
    # and test on two shared cores, a relay mutant ≈ 40-60 s.
    nice -n 19 cargo mutants \
        --no-shuffle "${where[@]}" \
        --file "$files" \
        "${pkg_args[@]}" \
        "${test_args[@]}" \
        --output "$out_dir" \
        --timeout-multiplier 3 || true
done
summary
