"""Merge result files of benchmarks/accuracy.py (runs of separate models or methods) into one, and print the
markdown table of the merged rows.

    python benchmarks/merge_results.py OUT.json PART.json [PART.json ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import accuracy


def merge(out: str, parts: list[str]) -> str:
    """Write the rows and originals of ``parts`` (in order) to ``out``; return the markdown table."""
    loaded = [json.loads(Path(p).read_text()) for p in parts]
    compensations = tuple(c for c in accuracy.COMPENSATIONS if any(c in row for p in loaded for row in p["rows"]))
    merged = {"originals": {}, "rows": [], "threads": loaded[0]["threads"], "kinds": loaded[0].get("kinds"),
              "compensations": list(compensations),
              "seconds": sum(p["seconds"] for p in loaded), "merged_from": [Path(p).name for p in parts]}
    for part in loaded:
        merged["originals"].update(part["originals"])
        merged["rows"] += part["rows"]
    Path(out).write_text(json.dumps(merged, indent=1))
    return accuracy.markdown(merged["rows"], merged["originals"], compensations)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(merge(sys.argv[1], sys.argv[2:]))
