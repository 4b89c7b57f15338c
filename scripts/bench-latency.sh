#!/usr/bin/env bash
# The match latency benchmark of issue 16: every mode of `comatching-load` the issue names, three
# runs each, with the per-stage breakdown; raw JSON to docs/bench/latency/<label>-<mode>-<run>.json.
# Not part of scripts/test.sh (it needs a quiet machine: run nothing else meanwhile).
#
#   scripts/bench-latency.sh LABEL [MODE...]     # modes: unloaded open1000 closed100k pinned
#   BIN=/path/to/build scripts/bench-latency.sh LABEL  # another build's binaries, not rebuilt
#   scripts/bench-latency.sh --summary LABEL...  # a Markdown table of the committed runs
#
# Release build of the binaries first (done here). The broker: the shared node (scripts/broker.sh)
# except in `pinned`, which starts a private node so it can pin it next to the relay.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/bench/latency
RUNS=${RUNS:-3}

if [ "${1:-}" = "--summary" ]; then
    shift
    python3 - "$OUT" "$@" <<'PY'
import json, sys, glob, os
out, labels = sys.argv[1], sys.argv[2:]
print("| label | mode | run | matches/s | p50 ms | p99 ms | relay CPU ms/match | load avg | relay stages (mean ms) | appliance total / broker hops (mean ms) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for label in labels:
    for f in sorted(glob.glob(f"{out}/{label}-*.json")):
        d = json.load(open(f))
        mode, run = os.path.basename(f)[len(label) + 1:-5].rsplit("-", 1)
        b = d.get("breakdown") or {}
        rs = b.get("relay", {})
        stages = " ".join(f"{k} {v['mean_ms']}" for k, v in rs.items() if k != "total" and v.get("mean_ms") is not None)
        app = (b.get("appliance", {}).get("total") or {}).get("mean_ms")
        cpu = (d.get("cpu_ms_per_match") or {}).get("relay")
        print(f"| {label} | {mode} | {run} | {d['rps']} | {d['p50_ms']} | {d['p99_ms']} | {cpu} | {d['loadavg_during_matches']} | {stages} | {app} / {b.get('broker_hops_mean_ms')} |")
PY
    exit 0
fi

LABEL=${1:?usage: scripts/bench-latency.sh LABEL [MODE...]}
shift
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(unloaded open1000 closed100k pinned)

# BIN=DIR: measure the binaries in DIR (comatching-load and, beside it, the relay and the
# appliance it starts: e.g. a copy of an older build, for before/after runs side by side).
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p comatching-relay -p comatching-appliance
    cargo build --release -q -p comatching-tests --bin comatching-load
fi
LOAD=${BIN:-target/release}/comatching-load
mkdir -p "$OUT"
for run in $(seq 1 "$RUNS"); do
    for mode in "${MODES[@]}"; do
        case $mode in
            unloaded) args=(--users 10000 --rate 50 --seconds 10) ;;
            open1000) args=(--users 10000 --rate 1000 --seconds 20) ;;
            closed100k) args=(--users 100000 --concurrency 64 --seconds 30) ;;
            pinned) args=(--users 10000 --concurrency 64 --seconds 20 --private-broker small --pin) ;;
            *) echo "unknown mode $mode" >&2; exit 2 ;;
        esac
        f="$OUT/$LABEL-$mode-$run.json"
        echo "bench-latency: $mode run $run -> $f" >&2
        "$LOAD" "${args[@]}" --matches-only --breakdown --seed "$run" >"$f.tmp"
        mv "$f.tmp" "$f"
    done
done
