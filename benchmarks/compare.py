"""Two sets of `rbee-mesh bench --json` reports side by side: before and after a change.

    python -m benchmarks.compare --before old-*.json --after new-*.json [--json OUT]

Run the two codebases' benches in turn (before, after, before, after, ...) on one machine, then
compare. For each mode and operation it prints the median p50 of each set, their ratio (after /
before: below 1 is faster), and the same ratio of p50 relative to the HTTP + SSE baseline of the
same run, which takes out how fast the machine was at the time of each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _medians(paths: Sequence[Path]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(mode, op) -> (median p50 in us, median p50 relative to HTTP + SSE in the same run)."""
    p50: dict[tuple[str, str], list[float]] = {}
    vs_http: dict[tuple[str, str], list[float]] = {}
    for path in paths:
        for row in json.loads(path.read_text())["results"]:
            key = (row["mode"], row["op"])
            p50.setdefault(key, []).append(float(row["p50_us"]))
            if row.get("p50_vs_http") is not None:
                vs_http.setdefault(key, []).append(float(row["p50_vs_http"]))
    return {
        key: (
            statistics.median(values),
            statistics.median(vs_http[key]) if key in vs_http else None,
        )
        for key, values in p50.items()
    }


def compare(before: Sequence[Path], after: Sequence[Path]) -> list[dict[str, Any]]:
    old, new = _medians(before), _medians(after)
    rows = []
    for key in sorted(old.keys() & new.keys()):
        (p50_old, rel_old), (p50_new, rel_new) = old[key], new[key]
        rows.append(
            {
                "mode": key[0],
                "op": key[1],
                "before_p50_us": p50_old,
                "after_p50_us": p50_new,
                "after_vs_before": round(p50_new / p50_old, 3),
                "after_vs_before_rel_http": (
                    round(rel_new / rel_old, 3) if rel_old and rel_new is not None else None
                ),
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("--before", nargs="+", type=Path, required=True, metavar="JSON")
    parser.add_argument("--after", nargs="+", type=Path, required=True, metavar="JSON")
    parser.add_argument("--json", dest="out", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = compare(args.before, args.after)
    print(f"{'op':<10} {'mode':<11} {'before p50':>12} {'after p50':>12} {'after/before':>13} "
          f"{'same, rel. HTTP':>16}")  # fmt: skip
    for r in rows:
        rel = r["after_vs_before_rel_http"]
        print(
            f"{r['op']:<10} {r['mode']:<11} {r['before_p50_us']:>10,.0f}us "
            f"{r['after_p50_us']:>10,.0f}us {r['after_vs_before']:>13.2f} "
            f"{'' if rel is None else f'{rel:.2f}':>16}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
