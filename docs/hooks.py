"""MkDocs hook: tables of the guides come from ``benchmarks/results/`` when the site is built.

A guide writes ``<!-- results-table: benchmarks/results/dc/digits.md 2 -->`` where it shows the
second table of that file; the build puts the table there as the file holds it now, so a rerun
benchmark updates the guides and no number is copied by hand. A missing file or table fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIVE = re.compile(r"^<!-- results-table: (?P<path>\S+) (?P<index>\d+) -->$", re.MULTILINE)


def tables(text: str) -> list[str]:
    """The markdown tables of ``text`` (runs of lines starting with ``|``), in order."""
    out, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def results_table(path: str, index: int) -> str:
    """Table ``index`` (1-based) of the results file ``path`` (relative to the repository)."""
    file = ROOT / path
    if not path.startswith("benchmarks/results/") or not file.is_file():
        raise ValueError(f"results-table: no results file {path!r}")
    found = tables(file.read_text(encoding="utf-8"))
    if not 1 <= index <= len(found):
        raise ValueError(f"results-table: {path} has {len(found)} tables, not {index}")
    return found[index - 1]


def on_page_markdown(markdown: str, page, config, files) -> str:
    return DIRECTIVE.sub(lambda m: results_table(m["path"], int(m["index"])), markdown)
