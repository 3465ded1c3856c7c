"""The SASS instructions where a kernel's warps stalled most, from Nsight Compute's source page:

    ncu --set full --import-source yes -k regex:NAME --launch-skip 2 --launch-count 1 -o /tmp/rep python3 SCRIPT
    ncu --import /tmp/rep.ncu-rep --page source --csv --print-source sass > /tmp/sass.csv
    python3 benchmarks/h200/sass_top.py /tmp/sass.csv [N]

Prints each of the N (default 30) most-sampled instructions with its share of all warp stall samples."""

from __future__ import annotations

import csv
import sys


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path: str, top: int = 30) -> None:
    rows = list(csv.reader(open(path)))
    start = next(i for i, r in enumerate(rows) if "Source" in r)  # ncu prints its own lines before the table
    header, data = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    source, samples = header.index("Source"), header.index("Warp Stall Sampling (All Samples)")
    total = sum(_number(r[samples]) for r in data) or 1.0
    print(f"{len(data)} instructions, {total:.0f} stall samples")
    for r in sorted(data, key=lambda r: -_number(r[samples]))[:top]:
        print(f"{100 * _number(r[samples]) / total:5.1f}%  {r[source].strip()[:110]}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30)
