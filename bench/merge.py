"""Merge result files of one device (e.g. a --full sweep split by --param-sets to keep each
command short) into one JSON + PNG, and print the combined table.

    python -m bench.merge bench/results/a.json bench/results/b.json -o bench/results/h100-full
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import report


def merge(paths) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    names = {p["env"]["device_name"] for p in parts}
    if len(names) != 1:
        raise SystemExit(f"refusing to merge results of different devices: {sorted(names)}")
    out = dict(parts[0])
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["ceilings"] = {k: v for p in parts for k, v in p["ceilings"].items()}
    out["merged_from"] = [dict(file=str(path), date=p["env"]["date"], git_sha=p["env"]["git_sha"],
                               config=p["config"], **({"partial": p["partial"]} if "partial" in p else {}))
                          for path, p in zip(paths, parts)]
    # a part written before its run finished (bench.cli's "partial") makes the whole partial
    out.pop("partial", None)
    partial = [f"{path}: {p['partial']}" for path, p in zip(paths, parts) if "partial" in p]
    if partial:
        out["partial"] = "; ".join(partial)
    if any(p["config"]["steps"] != out["config"]["steps"] for p in parts):
        out["config"] = dict(out["config"], steps="mixed (see merged_from)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True, help="output path without suffix")
    args = ap.parse_args(argv)
    result = merge(args.files)
    print(report.table(result))
    report.write_json(result, args.output.with_suffix(".json"))
    why = report.plot(result, args.output.with_suffix(".png"))
    print(f"\nresults: {args.output.with_suffix('.json')}" + ("" if why is None else f" (no plot: {why})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
