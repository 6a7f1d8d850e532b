"""``fewstep search usf`` and ``fewstep search timesteps``: the command line of the searches."""

from __future__ import annotations

import argparse

from fewstep.config import (
    add_cache_dir_argument,
    add_config_arguments,
    add_runtime_arguments,
    refuse_multiple_processes,
    resolve_config,
    torch_threads,
)
from fewstep.eval.testbeds import make_testbed

__all__ = ["add_search_parser"]

_EPILOG = (
    "Settings can also come from a YAML file and key=value items (later wins):\n"
    "  defaults < --config FILE.yaml < flags < key=value\n"
    "  fewstep search {cmd} --config configs/search/{preset} budget=60\n"
    "The run folder (--run-dir, default OUT without suffix + .run) keeps the evaluation log, the state\n"
    "and the reference: rerunning the same command resumes a killed search, and a larger --budget\n"
    "continues a finished one."
)


def _on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return value == "on"


def _common(p: argparse.ArgumentParser, default_out: str, default_budget: int, default_samples: int) -> None:
    p.add_argument("--nfe", type=int, metavar="N", help="model evaluations of the schedule (default: 5)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--budget", type=int, metavar="N", help=f"full evaluations (default: {default_budget})")
    p.add_argument("--out", metavar="FILE", help=f"solver schedule file, .json or .yaml (default: {default_out})")
    p.add_argument("--run-dir", dest="run_dir", metavar="DIR", help="log, state and reference of the search")
    p.add_argument("--num-samples", dest="num_samples", type=int, metavar="N",
                   help=f"search samples (default: {default_samples})")
    p.add_argument("--data-seed", dest="data_seed", type=int, metavar="N",
                   help="noise seed of the first search sample, >= 100000 so the batch never meets the "
                        "evaluation seeds 0..N-1 (default: 100000)")
    p.add_argument("--metric", choices=["mse", "fd"], help="fitness: MSE to the reference (default) or the FD")
    p.add_argument("--validation-samples", dest="validation_samples", type=int, metavar="N",
                   help="held-out samples (seeds after the search batch) on which the result is checked against "
                        "its baseline (default: 128)")
    p.add_argument("--keep-worse", dest="keep_worse", action="store_true",
                   help="write the searched schedule even when it does not beat the baseline on validation")
    add_cache_dir_argument(p, "reference samples in DIR/references")
    add_runtime_arguments(p)


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep search`` with its ``usf`` and ``timesteps`` subcommands."""
    from fewstep.tuning.search.s3 import USFSearchConfig
    from fewstep.tuning.search.timesteps import TimestepSearchConfig

    search = sub.add_parser("search", help="search solver schedules (S3 over USF strategies, or tuned timesteps)",
                            description="Search solver schedules; the result is a file any fewstep scheduler loads.")
    inner = search.add_subparsers(dest="search_command", required=True, metavar="{usf,timesteps}")
    kw = dict(formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)

    p = inner.add_parser(
        "usf", help="S3: evolutionary search over USF solver schedules with a learned predictor",
        description=("S3 (Liu et al., ICLR 2024): evolutionary search over per-step solver strategies and\n"
                     "timesteps, a learned predictor ranking candidates, fitness from the MSE to a cached\n"
                     "high-NFE reference on search samples (seeds 100000+). Run the result with\n"
                     "fewstep.sample(..., solver='usf', solver_schedule=OUT) or fewstep.USFScheduler."),
        epilog=_EPILOG.format(cmd="usf", preset="usf-gmm.yaml"), **kw)
    _common(p, "runs/usf-schedule.json", 200, 256)
    p.add_argument("--predictor", type=_on_off, metavar="on|off", help="rank candidates with the predictor (default: on)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the search's random choices (default: 0)")
    p.add_argument("--init", nargs="+", metavar="FILE", help="extra schedules to start from (a warm start)")
    add_config_arguments(p, USFSearchConfig)
    p.set_defaults(func=_cmd_usf)

    p = inner.add_parser(
        "timesteps", help="tune the timesteps of any registered solver (a timesteps-only solver schedule)",
        description=("Optimise the interior timesteps of a solver against a cached high-NFE reference on a\n"
                     "few search samples (derivative-free; DMN/LD3-style). Use the result with that solver:\n"
                     "fewstep.sample(..., solver='unipc', solver_schedule=OUT)."),
        epilog=_EPILOG.format(cmd="timesteps", preset="timesteps-gmm.yaml"), **kw)
    _common(p, "runs/timesteps.json", 150, 128)
    p.add_argument("--solver", metavar="SPEC", help="solver spec, e.g. unipc:order=3 (default: unipc)")
    add_config_arguments(p, TimestepSearchConfig)
    p.set_defaults(func=_cmd_timesteps)


def _run(args: argparse.Namespace, schema: type, runner) -> int:
    refuse_multiple_processes(f"search {args.search_command}")
    cfg = resolve_config(schema, args)
    args.resume_hint = "finished evaluations are kept in the run folder; run the same command again to resume"
    with torch_threads(cfg.threads):
        runner(cfg, make_testbed(cfg.model, cfg.device))
    return 0


def _cmd_usf(args: argparse.Namespace) -> int:
    from fewstep.tuning.search.s3 import USFSearchConfig, run_usf_search

    return _run(args, USFSearchConfig, run_usf_search)


def _cmd_timesteps(args: argparse.Namespace) -> int:
    from fewstep.tuning.search.timesteps import TimestepSearchConfig, run_timestep_search

    return _run(args, TimestepSearchConfig, run_timestep_search)
