"""A seeded random subset of a CSV manifest, written next to it (so its relative paths still resolve).

Used for the ELPV bench in the README, where CPU time allows 1,000 of the 2,624 images::

    python benchmarks/subset_manifest.py data/elpv/manifest.csv data/elpv/elpv-1000.csv --n 1000 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import random
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("dest", type=Path, help="the subset manifest; put it in the same folder as MANIFEST")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dest.resolve().parent != args.manifest.resolve().parent:
        parser.error("write the subset next to the manifest, so its relative image paths resolve")
    with args.manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames or ["path", "label"], list(reader)
    random.Random(args.seed).shuffle(rows)
    subset = sorted(rows[: args.n], key=lambda r: r["path"])
    with args.dest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(subset)
    counts = Counter(r.get("label", "") for r in subset)
    print(f"{args.dest}: {len(subset)} of {len(rows)} rows ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")


if __name__ == "__main__":
    main()
