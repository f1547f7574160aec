"""Run a benchmark script that this checkout may not have, and collect its JSON into one file.

    python benchmarks/run_optional.py --script benchmarks/bench_sequence.py --out X.json -- ARGS

With the script present it runs (its results dir pointed at a scratch folder, via
``BENCH_RESULTS_DIR``) and every JSON it writes lands in ``--out`` under ``"files"``. Without it,
``--out`` records why there are no numbers, so the figure built from it can say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--script", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()
    doc: dict = {"benchmark": Path(args.script).stem.removeprefix("bench_"),
                 "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not Path(args.script).exists():
        doc["missing"] = f"{args.script} does not exist in this checkout: no measurements"
    else:
        with tempfile.TemporaryDirectory() as scratch:
            env = {**os.environ, "BENCH_RESULTS_DIR": scratch}
            subprocess.run([sys.executable, args.script, *args.args], env=env, check=True)
            doc["files"] = {p.stem: json.loads(p.read_text())
                            for p in sorted(Path(scratch).glob("*.json"))}
        if not doc["files"]:
            doc["missing"] = f"{args.script} ran but wrote no JSON"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
