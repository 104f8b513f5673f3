"""Helpers shared by the benchmark scripts."""
import csv
import os


def write_rows(path: str, rows) -> None:
    """Writes a list of dicts as CSV (header from the first row), creating folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"rows written to {path}")
