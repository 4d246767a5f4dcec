#!/usr/bin/env python3
"""Summarizes an Nsight Compute (ncu) run of the benchmark's CUDA kernels.

    ncu --metrics <METRICS> --kernel-name regex:^bn_ -o run bench --device cuda ...
    ncu --import run.ncu-rep --page raw --csv --print-units base > run.csv
    python3 benches/ncu_table.py run.csv [--label "32x256x56x56 f32"]

METRICS are those in `METRICS` below (scripts/gpu-run.sh's `profile` step
passes them). Prints one row per kernel and grid: how many launches were
profiled, the median duration, DRAM bytes moved and their rate, DRAM and SM
throughput as a percentage of the GPU's peak, achieved occupancy and
registers per thread: where a kernel below the copy's bandwidth loses it.
"""

import argparse
import csv
import statistics
import sys

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
]

# Scale of each unit ncu may print, to bytes and nanoseconds.
UNITS = {
    "byte": 1.0,
    "Kbyte": 1e3,
    "Mbyte": 1e6,
    "Gbyte": 1e9,
    "nsecond": 1.0,
    "usecond": 1e3,
    "msecond": 1e6,
    "second": 1e9,
}


def number(text):
    """A value as ncu writes it ("1,234.5", "n/a", ""), or None."""
    text = text.replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def read_rows(path):
    """The kernel rows of an ncu raw-page CSV export: dicts of metric -> value
    in base units, plus "Kernel Name", "Grid Size" and "Block Size"."""
    with open(path, newline="") as f:
        table = [row for row in csv.reader(f)]
    # ncu may print messages ("==PROF== ...") before the table.
    start = next((i for i, row in enumerate(table) if "Kernel Name" in row), None)
    if start is None:
        return []
    header = table[start]
    body = table[start + 1 :]
    # The units row: its first field ("ID") is empty.
    units = [""] * len(header)
    if body and body[0] and body[0][0] == "":
        units, body = body[0], body[1:]
    rows = []
    for raw in body:
        if len(raw) != len(header):
            continue
        row = {}
        for name, unit, value in zip(header, units, raw):
            if name in METRICS:
                v = number(value)
                row[name] = None if v is None else v * UNITS.get(unit, 1.0)
            else:
                row[name] = value
        rows.append(row)
    return rows


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def summarize(rows):
    """One line per (kernel, grid, block), in order of first launch."""
    groups = {}
    for r in rows:
        key = (r.get("Kernel Name", "?"), r.get("Grid Size", "?"), r.get("Block Size", "?"))
        groups.setdefault(key, []).append(r)
    out = []
    for (name, grid, block), rs in groups.items():
        t = median([r.get("gpu__time_duration.sum") for r in rs])
        rd = median([r.get("dram__bytes_read.sum") for r in rs])
        wr = median([r.get("dram__bytes_write.sum") for r in rs])
        moved = None if rd is None or wr is None else rd + wr
        rate = None if moved is None or not t else moved / t  # bytes/ns = GB/s
        out.append(
            {
                "kernel": name,
                "grid": grid.replace(" ", ""),
                "block": block.replace(" ", ""),
                "n": len(rs),
                "us": None if t is None else t / 1e3,
                "mb": None if moved is None else moved / 1e6,
                "gbs": rate,
                "dram": median([r.get("dram__throughput.avg.pct_of_peak_sustained_elapsed") for r in rs]),
                "sm": median([r.get("sm__throughput.avg.pct_of_peak_sustained_elapsed") for r in rs]),
                "occ": median([r.get("sm__warps_active.avg.pct_of_peak_sustained_active") for r in rs]),
                "regs": median([r.get("launch__registers_per_thread") for r in rs]),
            }
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", nargs="?", help="ncu's CSV export (--import R --page raw --csv --print-units base)")
    ap.add_argument("--label", default="", help="a title line for the table")
    ap.add_argument("--print-metrics", action="store_true", help="print the metrics to collect (for ncu --metrics) and exit")
    args = ap.parse_args()
    if args.print_metrics:
        print(",".join(METRICS))
        return
    if args.log is None:
        ap.error("the CSV export is required")
    rows = read_rows(args.log)
    if not rows:
        sys.exit(f"no kernel rows in {args.log} (did ncu profile any bn_ kernel?)")
    if args.label:
        print(f"## {args.label}")
    print(
        f"{'kernel':<34} {'grid':>14} {'block':>10} {'n':>3} {'us':>9} {'DRAM MB':>8} "
        f"{'GB/s':>7} {'DRAM%':>6} {'SM%':>5} {'occ%':>5} {'regs':>4}"
    )
    for s in summarize(rows):
        print(
            f"{s['kernel'][:34]:<34} {s['grid'][:14]:>14} {s['block'][:10]:>10} {s['n']:>3} "
            f"{fmt(s['us'], '9.2f')} {fmt(s['mb'], '8.2f')} {fmt(s['gbs'], '7.0f')} "
            f"{fmt(s['dram'], '6.1f')} {fmt(s['sm'], '5.1f')} {fmt(s['occ'], '5.1f')} {fmt(s['regs'], '4.0f')}"
        )


if __name__ == "__main__":
    main()
