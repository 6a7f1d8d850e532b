"""Compatibility table of the docs (pipeline family x scheduler) (pipeline family x scheduler) from the pipeline matrix's outcomes.

    python benchmarks/pipeline_matrix.py                      # run the full matrix, then render
    python benchmarks/pipeline_matrix.py --results FILE.json  # render outcomes recorded earlier

Running means ``FEWSTEP_MATRIX_RESULTS=FILE pytest -m slow tests/test_pipelines_matrix.py`` (tiny
random-weight pipelines, no downloads; about 20 minutes on one CPU core). Outcomes go to
benchmarks/results/pipeline_matrix.json, the table to benchmarks/results/pipeline_matrix.md, which
the docs page docs/diffusers-differences.md includes when the site is built (``mkdocs build``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_matrix(out: Path) -> int:
    """Run the slow matrix with outcomes recorded to ``out``; returns pytest's exit status."""
    out.unlink(missing_ok=True)
    env = {**os.environ, "FEWSTEP_MATRIX_RESULTS": str(out)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_pipelines_matrix.py")]
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def _cell(records: list[dict]) -> str:
    statuses = {r["status"] for r in records}
    if "fail" in statuses:
        return "**FAIL**"
    parts = []
    diffs = [r for r in records if r["status"] == "difference"]
    if diffs:
        worst = max(r["value"] for r in diffs)
        parts.append(f"difference (max {worst:.1e})")
    refused = sorted({r["check"] for r in records if r["status"] == "refused"})
    if refused:
        parts.append("refuses " + ", ".join(refused))
    twins = [r["value"] for r in records if r["status"] == "works" and r["value"] is not None
             and "twin" in r["detail"]]
    if not parts:
        return f"works (= twin, max {max(twins):.0e})" if twins else "works"
    return "works; " + "; ".join(parts)


def render(records: list[dict]) -> str:
    """The markdown table and the list of differences and refusals with their measured sizes."""
    families = list(dict.fromkeys(r["family"] for r in records))
    schedulers = list(dict.fromkeys(r["scheduler"] for r in records))
    cells = defaultdict(list)
    for r in records:
        cells[r["family"], r["scheduler"]].append(r)
    lines = ["| family | " + " | ".join(schedulers) + " |", "|---|" + "---|" * len(schedulers)]
    for f in families:
        lines.append(f"| {f} | " + " | ".join(_cell(cells[f, s]) if cells[f, s] else "-" for s in schedulers) + " |")
    notes = defaultdict(list)
    for r in records:
        if r["status"] in ("difference", "refused"):
            notes[r["status"], r["detail"]].append(r)
    lines += ["", "Documented differences and refusals (measured):", ""]
    for (status, detail), rs in sorted(notes.items()):
        values = [r["value"] for r in rs if r["value"] is not None]
        size = f"; relative difference {min(values):.1e} .. {max(values):.1e}" if values else ""
        where = sorted({f"{r['family']} / {r['scheduler']}" for r in rs})
        lines.append(f"- {status}: {detail} ({len(rs)} checks{size}): " + ", ".join(where[:6])
                     + (f", ... ({len(where)} cells)" if len(where) > 6 else ""))
    fails = [r for r in records if r["status"] == "fail"]
    total = len(records)
    lines += ["", f"{total} checks, {len(fails)} failures, "
              f"{sum(r['status'] == 'difference' for r in records)} documented differences, "
              f"{sum(r['status'] == 'refused' for r in records)} refusals."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, nargs="+",
                        help="outcome JSON files to render together (default: run the matrix)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sources = args.results
    if sources is None:
        sources = [RESULTS / "pipeline_matrix.json"]
        status = run_matrix(sources[0])
        if status not in (0, 1):
            print(f"pipeline_matrix: error: pytest exited with status {status}", file=sys.stderr)
            return status
    records = [r for source in sources for r in json.loads(source.read_text())]
    table = render(records)
    (RESULTS / "pipeline_matrix.json").write_text(json.dumps(records, indent=1))
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".md") as tmp:
        tmp.write(table)
    os.replace(tmp.name, RESULTS / "pipeline_matrix.md")
    print(table)
    return 0 if not any(r["status"] == "fail" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
