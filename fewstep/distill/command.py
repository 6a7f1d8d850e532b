"""``fewstep distill train | estimate``: the command line of distillation (AGD and HiPA).

Under a launcher that takes a module: ``accelerate launch -m fewstep distill train --config FILE``
(or ``torchrun --nproc_per_node N -m fewstep distill train ...``).
"""

from __future__ import annotations

import argparse
import json

from .estimate import estimate, format_estimate
from .settings import DistillConfig
from .train import _AGDTraining, train

__all__ = ["add_distill_parser"]


def add_distill_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep distill train | estimate`` (under accelerate: ``accelerate launch -m fewstep distill train``)."""
    from fewstep.config import add_config_arguments

    group = sub.add_parser("distill", help="distillation: train AGD guidance adapters or HiPA one-step LoRA "
                                           "(distill train | estimate)",
                           description="Adapter guidance distillation (AGD) and HiPA one-step adapters.")
    inner = group.add_subparsers(dest="distill_command", required=True, metavar="SUBCOMMAND")
    p = inner.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train AGD guidance adapters or (method=hipa) HiPA one-step LoRA on CFG teacher data "
             "(resumable; accelerate launch / torchrun)",
        description="Train guidance adapters (AGD) on CFG teacher trajectories, or with method=hipa a one-step "
                    "LoRA (HiPA) on CFG teacher samples. "
                    "Settings: see configs/distill/*.yaml; key=value items override the file.")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=_cmd_train)
    add_estimate_parser(inner)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from fewstep.config import resolve_config

    args.resume_hint = "rerun with resume_from_checkpoint=latest to continue from the last checkpoint"
    cfg = resolve_config(DistillConfig, args)
    folder = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line, from the main process
        if cfg.method == "hipa":
            from .hipa_train import done_message

            print(done_message(folder, cfg))
        else:
            print(_AGDTraining.done_message(folder))
    return 0


def add_estimate_parser(inner: argparse._SubParsersAction) -> None:
    """Register ``fewstep distill estimate``."""
    from fewstep.config import add_config_arguments

    p = inner.add_parser("estimate", argument_default=argparse.SUPPRESS,
                         help="print the disk, host RAM and GPU memory a distill train config needs (no work)",
                         description="Estimate the trajectory disk space and the per-process host RAM and GPU memory "
                                     "of a distill train config, without loading weights.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_config_arguments(p, DistillConfig)
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    from fewstep.config import resolve_config

    as_json = getattr(args, "json", False)
    if hasattr(args, "json"):
        del args.json
    est = estimate(resolve_config(DistillConfig, args))
    print(json.dumps(est.to_dict(), indent=2) if as_json else format_estimate(est))
    return 0
