"""Where the demo's minutes go: Snakemake's benchmark TSVs of one run as a markdown table.

    python benchmarks/demo_profile.py [results/benchmarks] [--install-s 95]

Reads every ``<rule>.tsv`` directly under the folder and under ``demo/`` (the stage rules'
``benchmark:`` files:
wall seconds, peak RSS, CPU seconds) and prints one row per rule, longest first, with its share
of the summed wall time. Imports, data generation, training, inference and figures are the
rules themselves (each rule's time includes its Python start-up and imports). ``--install-s``
adds the environment creation (``make``'s venv step), which Snakemake does not see.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read(folder: Path) -> list[dict]:
    rows = []
    # the stage rules, then the demo-size benchmarks behind the demo's scaling figure
    for path in sorted(folder.glob("*.tsv")) + sorted(folder.glob("demo/*.tsv")):
        with path.open() as f:
            records = list(csv.DictReader(f, delimiter="\t"))
        if records:
            last = records[-1]  # a rule run several times keeps one line per run
            name = path.stem if path.parent == folder else f"bench_{path.stem} (demo size)"
            rows.append({"rule": name, "wall_s": float(last["s"]),
                         "max_rss_mib": float(last["max_rss"]) if last["max_rss"] != "-" else 0.0,
                         "cpu_s": float(last["cpu_time"]) if last["cpu_time"] != "-" else 0.0})
    return sorted(rows, key=lambda r: -r["wall_s"])


def markdown(rows: list[dict], install_s: float | None) -> str:
    if install_s:
        rows = [{"rule": "(install: venv + pip)", "wall_s": install_s, "max_rss_mib": 0.0,
                 "cpu_s": 0.0}, *rows]
    total = sum(r["wall_s"] for r in rows) or 1.0
    lines = ["| step | wall s | share | CPU s | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['rule']} | {r['wall_s']:.1f} | {100 * r['wall_s'] / total:.0f}% | "
              f"{r['cpu_s']:.1f} | {r['max_rss_mib']:.0f} |" for r in rows]
    lines.append(f"| **sum** | **{total:.1f}** | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default="results/benchmarks", type=Path)
    parser.add_argument("--install-s", type=float, help="seconds the environment took")
    args = parser.parse_args()
    print(markdown(read(args.folder), args.install_s))


if __name__ == "__main__":
    main()
