"""Print the README's headline table from bench/results/similarity.csv (no measuring here)."""
import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "similarity.csv"


def cell(row: dict) -> str:
    if row.get("median_ms"):
        return f"{float(row['median_ms']):,.0f} ms, +{float(row['peak_extra_MiB']):,.0f} MiB"
    note = row.get("note", "")
    return note.replace("not run: ", "not run: ").replace(" in the Triton CPU interpreter", " (interpreter)")


def main(path: Path = RESULTS) -> None:
    rows = list(csv.DictReader(open(path)))
    env = rows[0]
    print(f"Measured by `make bench` on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}: φ forward + backward to both maps, median of 3; memory is the peak beyond "
          "the inputs (VmHWM delta on CPU).\n")
    print("| channels | maps | batch | input | naive | gram | gram peak / input |")
    print("|---|---|---|---|---|---|---|")
    keyed = {(r["pair"], r["size"], r["batch"], r["backend"]): r for r in rows}
    for (pair, size, batch, backend), r in keyed.items():
        if backend != "gram":
            continue
        naive = keyed[(pair, size, batch, "naive")]
        ratio = r.get("peak_extra_over_input") or ""
        print(f"| {pair} | {size} | {batch} | {float(r['input_MiB']):,.0f} MiB | {cell(naive)} | {cell(r)} | "
              f"{ratio}× |")
    print()
    for r in rows:
        if r.get("naive_over_gram"):
            print(f"- naive/gram time at N = 4,096, {r['pair']}, batch {r['batch']}: {r['naive_over_gram']}×")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
