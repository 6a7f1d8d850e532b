"""Pages generated at build time (mkdocs-gen-files): nothing here is written by hand, so nothing can drift.

- ``reference/``: one API page per module of the ``fewstep`` package, found by walking the source tree
  (mkdocstrings renders the docstrings by static analysis; nothing is imported), and its nav.
- ``cli.md``: the reference of every ``fewstep`` command, appended from the argparse parsers.
- ``development.md``: the module map (every module of ``fewstep`` with its docstring's first line).
- ``benchmarks.md``: every table under ``benchmarks/results/`` (``*.md``), appended as stored; the
  figures (``*.png``) are copied to ``results/``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fewstep"


def api_pages() -> None:
    nav = mkdocs_gen_files.Nav()
    for name, doc, path in _modules():
        nav[tuple(name.split("."))] = doc.relative_to("reference").as_posix()
        with mkdocs_gen_files.open(doc, "w") as f:
            f.write(f"# `{name}`\n\n::: {name}\n")
        mkdocs_gen_files.set_edit_path(doc, path.relative_to(ROOT))
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
        f.writelines(nav.build_literate_nav())


def _modules():
    """(dotted name, API page, source path) of every module of the package (``__main__`` aside)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
            yield ".".join(parts), Path("reference", *parts, "index.md"), path
        else:
            yield ".".join(parts), Path("reference", *parts).with_suffix(".md"), path


def module_map() -> None:
    out = ["", "## Module map (generated)", "",
           "Every module of the package with the first line of its docstring, read from the source when the",
           "site is built; each links to its API page.", "", "| module | what it is |", "|---|---|"]
    for name, doc, path in _modules():
        summary = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip().split("\n")[0]
        summary = summary.replace("|", r"\|")
        out.append(f"| [`{name}`]({doc.as_posix()}) | {summary} |")
    with mkdocs_gen_files.open("development.md", "a") as f:
        f.write("\n".join(out) + "\n")


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def cli_reference() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ["COLUMNS"] = "100"  # argparse wraps help text at the terminal width: fix it
    from fewstep.cli import build_parser

    parser, _ = build_parser(True)
    out = ["", "## Reference (generated from the parsers)", "",
           "Every command's `--help`, generated from `fewstep.cli`'s argparse parsers when the site is built.", ""]

    def walk(p: argparse.ArgumentParser, words: list[str]) -> None:
        out.extend([f"### `{' '.join(words)}`", "", "```text", p.format_help().rstrip(), "```", ""])
        for name, child in _subcommands(p):
            walk(child, [*words, name])

    walk(parser, ["fewstep"])
    with mkdocs_gen_files.open("cli.md", "a") as f:
        f.write("\n".join(out))


def benchmark_tables() -> None:
    results = ROOT / "benchmarks" / "results"
    for image in sorted(results.rglob("*.png")):  # figures the guides show, under results/ in the site
        with mkdocs_gen_files.open(Path("results", image.relative_to(results)), "wb") as f:
            f.write(image.read_bytes())
    out = ["", "## Result tables (generated from `benchmarks/results/`)", "",
           "Every `*.md` file under `benchmarks/results/`, included as stored when the site is built.", ""]
    for path in sorted(results.rglob("*.md")):
        rel = path.relative_to(ROOT).as_posix()
        out.extend([f"### `{rel}`", ""])
        for line in path.read_text(encoding="utf-8").splitlines():
            # a result file's own headings sit below this page's
            out.append("###" + line if re.match(r"^#{1,3} ", line) else line)
        out.append("")
    with mkdocs_gen_files.open("benchmarks.md", "a") as f:
        f.write("\n".join(out))


api_pages()
module_map()
cli_reference()
benchmark_tables()
