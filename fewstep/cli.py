"""Command line: ``fewstep solvers``, ``fewstep compare``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _describe_option(opt) -> str:
    if opt.choices is not None:
        allowed = "|".join(map(str, opt.choices))
    elif opt.bounds is not None:
        allowed = f"{opt.bounds[0]:g}..{opt.bounds[1]:g}"
    else:
        allowed = {"bool": "true|false", "int_list": "list of step indices"}.get(opt.kind, opt.kind)
    return allowed


def cmd_solvers(args: argparse.Namespace) -> int:
    """List registered solvers with their options."""
    from .samplers import list_solvers, solver_class

    entries = []
    for name in list_solvers():
        cls = solver_class(name)
        options = {
            key: {"default": list(o.default) if isinstance(o.default, tuple) else o.default,
                  "allowed": _describe_option(o), "doc": o.doc}
            for key, o in cls.options.items()
        }
        entries.append({"name": name, "summary": cls.summary, "paper": cls.paper, "options": options})
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        print(f"{e['name']}: {e['summary']}")
        print(f"    {e['paper']}")
        for key, o in e["options"].items():
            print(f"    {key}={o['default']!r}  [{o['allowed']}]  {o['doc']}")
        print()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fewstep`` console script."""
    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("solvers", help="list registered solvers and their options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_solvers)

    from .eval.compare import add_compare_parser

    add_compare_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fewstep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
