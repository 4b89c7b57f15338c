# Used by scripts/mutants.sh (imported by its inline Python): one module's outcomes.json files,
# from a whole run or from its shards (MUTANTS_SHARD), merged into one. Only files that exist
# are read (an unmatched shell glob is passed through literally).
import json
import os


def merge(paths):
    out = {"outcomes": [], "end_time": True}
    for path in paths:
        if not os.path.exists(path):
            continue
        d = json.load(open(path))
        for k in ("total_mutants", "caught", "missed", "timeout", "unviable", "success"):
            out[k] = out.get(k, 0) + d.get(k, 0)
        if d.get("end_time") is None:
            out["end_time"] = None
        out["outcomes"].extend(d.get("outcomes", []))
    return out
