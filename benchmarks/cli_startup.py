"""Start-up time of the ``fewstep`` command line, as a ratio to a bare ``python -c pass``.

Each command runs in a fresh interpreter (so imports are not cached), interleaved with the bare
interpreter, ``--repeats`` times; the table reports medians and the ratio. One thread
(``OMP_NUM_THREADS=1``), as the CLI defaults to.

    python benchmarks/cli_startup.py [--repeats 7] [--out benchmarks/results/cli_startup.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "fewstep --help": [sys.executable, "-m", "fewstep.cli", "--help"],
    "fewstep compare --help": [sys.executable, "-m", "fewstep.cli", "compare", "--help"],
    "fewstep eval fd --help": [sys.executable, "-m", "fewstep.cli", "eval", "fd", "--help"],
    "import fewstep.cli": [sys.executable, "-c", "import fewstep.cli"],
    "import fewstep (+ fewstep.sample)": [sys.executable, "-c", "import fewstep; fewstep.sample"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():  # interleaved: load changes hit every command alike
            start = time.perf_counter()
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c pass"])
    lines = [f"| command ({args.repeats} runs, medians, OMP_NUM_THREADS=1) | seconds | x python -c pass |",
             "|---|---:|---:|"]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"| `{name}` | {med:.3f} | {med / base:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"# CLI start-up\n\n`python benchmarks/cli_startup.py --repeats {args.repeats}`"
                                  f"\n\n{table}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
