"""The fewstep command line: fast diffusion sampling, one solver core.

Commands that run jobs read settings from flags, a YAML file (--config FILE.yaml) and
key=value items, and save the resolved settings beside their results. A user mistake
(bad setting, unreadable or malformed file) prints one "fewstep <command>: error: ..."
line and exits with status 2; Ctrl-C exits with 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Sequence

from ._extras import MissingExtraError
from .config import split_overrides

# What a user can cause and fix: bad settings or input files (ValueError, which includes
# JSON and config errors), file-system problems (OSError) and a missing optional package.
USER_ERRORS = (ValueError, OSError, MissingExtraError)


def _describe_option(opt) -> str:
    if opt.choices is not None:
        allowed = "|".join(map(str, opt.choices))
    elif opt.bounds is not None:
        allowed = f"{opt.bounds[0]:g}..{opt.bounds[1]:g}"
    elif opt.kind == "artifact":
        allowed = f"{opt.artifact.kind} file"
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


def cmd_list_schedules(args: argparse.Namespace) -> int:
    """List the built-in published schedules (``solver_schedule="ays:sd15"``)."""
    from .samplers.solver_schedule import list_published

    entries = list_published()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        print(f"{e['name']}: {e['method']}, {e['nfe']} steps ({e['interpolation']} interpolation to others), "
              f"for {e['model_family']}")
        print(f"    {e['source']}")
    return 0


# Each command's parser lives beside its code, whose import pulls in torch (seconds): only the
# command named on the command line is built for real, the others are stubs with their one-line
# help, so ``fewstep --help`` imports none of them. tests/test_hardening2.py checks that these
# lines match the ones the modules register.
_COMMANDS = {
    "compare": ("fewstep.eval.compare", "add_compare_parser",
                "benchmark solvers at low NFE against a high-NFE reference"),
    "search": ("fewstep.tuning.search.cli", "add_search_parser",
               "search solver schedules (S3 over USF strategies, or tuned timesteps)"),
    "calibrate": ("fewstep.tuning.dc.command", "add_calibrate_parser",
                  "tune solver artifacts for a model (dc: DC-Solver ratios / CPR)"),
    "ems": ("fewstep.tuning.ems.command", "add_ems_parser", "DPM-Solver-v3 empirical model statistics"),
    "eval": ("fewstep.eval.eval_cli", "add_eval_parser",
             "FID/FD and MSE benchmarks of solvers, reference statistics, FD of two files"),
    "distill": ("fewstep.distill.command", "add_distill_parser",
                "distillation: train AGD guidance adapters or HiPA one-step LoRA (distill train | estimate)"),
}


def build_parser(only: str | None | bool = True) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``fewstep`` parser and its subcommands.

    Args:
        only: ``True`` builds every command's parser; a command name builds that one and stubs
            for the rest (enough to parse a command line naming it, fast); ``None`` builds stubs only.
    """
    import importlib

    from fewstep._version import __version__

    parser = argparse.ArgumentParser(prog="fewstep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("solvers", help="list registered solvers and their options",
                       description="List the registered solvers, their papers and options.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_solvers)

    p = sub.add_parser("list", help="list solvers or built-in published schedules",
                       description="List registered solvers or the built-in published schedules.")
    what = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, func, text in (("solvers", cmd_solvers, "registered solvers and their options"),
                             ("schedules", cmd_list_schedules, "built-in published schedules (solver_schedule=NAME)")):
        q = what.add_parser(name, help=text, description=text)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        q.set_defaults(func=func)

    for name, (module, adder, help_line) in _COMMANDS.items():
        if only is True or only == name:
            getattr(importlib.import_module(module), adder)(sub)
        else:
            sub.add_parser(name, help=help_line, add_help=False)
    return parser, sub


def _command(sub: argparse._SubParsersAction, argv: Sequence[str]) -> tuple[str | None, argparse.ArgumentParser | None]:
    """The command words (``eval fid``) and the innermost subparser they name."""
    words, choices, leaf = [], sub.choices, None
    for arg in argv:
        if arg.startswith("-"):
            continue
        if choices is None or arg not in choices:
            break
        words.append(arg)
        leaf = choices[arg]
        nested = [a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)]
        choices = nested[0].choices if nested else None
    if not words:
        return next((a for a in argv if not a.startswith("-")), None), None
    return " ".join(words), leaf


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a ``fewstep`` command line (without running it): the namespace whose ``func`` runs it.

    ``key=value`` items may stand anywhere, even after a flag that takes several values.

    Raises:
        SystemExit: argparse's exit for ``--help`` or a malformed command line (status 2, the
            message naming the subcommand).
    """
    argv = list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser, sub = build_parser(first if first in _COMMANDS else None)
    _, leaf = _command(sub, argv)
    overrides: list[str] = []
    if leaf is not None and leaf.get_default("config_schema") is not None:
        argv, overrides = split_overrides(argv, leaf.get_default("config_schema"))
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser, so the message names the subcommand
        (leaf or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*getattr(args, "overrides", []), *overrides]
    return args


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror and not exc.args[1:]:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def _silence_stdout() -> None:
    # The reader went away (``fewstep solvers --json | head``): point stdout at /dev/null so
    # the interpreter's final flush does not raise again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fewstep`` console script; returns the exit status."""
    command = "?"
    args = None
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = next((a for a in argv if not a.startswith("-")), "?")
        args = parse_command_line(argv)
        command = " ".join(filter(None, [args.command, getattr(args, f"{args.command}_command", None)]))
        from .samplers.artifacts import ArtifactModelWarning

        with warnings.catch_warnings():
            # A tuned file used on another model than it was tuned on: the API warns, a command stops.
            warnings.simplefilter("error", ArtifactModelWarning)
            try:
                return args.func(args)  # a command may set args.resume_hint for the Ctrl-C message
            except ArtifactModelWarning as exc:
                raise ValueError(str(exc).replace("it may not transfer", "refused (tune it on this model)")) from None
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print(f"\nfewstep {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except USER_ERRORS as exc:
        print(f"fewstep {command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
