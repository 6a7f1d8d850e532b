"""``fewstep calibrate dc``: DC-Solver ratios (or CPR coefficients) for a model, resumably.

One (NFE, guidance) pair writes a ``dc_ratios`` file; ``--grid`` calibrates every pair of
the NFE and guidance lists and fits the 36 CPR coefficients to them (a ``dc_cpr`` file).
Beside the output ``OUT`` the folder ``OUT_STEM.calibration/`` holds the resolved config,
the DDIM references (one per guidance), the optimiser state of the pair in progress
(rewritten atomically after every iteration) and the ratios of every finished pair: a run
killed at any point resumes where it stopped when the same command is run again and ends
with the same files. Calibration noise uses seeds ``seed, seed + 1, ...`` (default 100000,
disjoint from the evaluation seeds 0, 1, ... of ``fewstep compare``): the first
``num_samples`` fit the ratios, the next ``validation_samples`` choose the objective
(``auto``) and check the result against the base solver; ratios that lose there are written
as all ones (the base solver, said in one line) unless ``keep_worse``. The verdict, both
validation MSEs and a paired-bootstrap interval are in the file's ``meta.extra.validation``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from fewstep.config import (
    add_config_arguments,
    add_runtime_arguments,
    check_runtime_settings,
    refuse_multiple_processes,
    resolve_config,
    save_config,
    torch_threads,
)
from fewstep.infra.validation import check_count, check_guidance_list, check_nfe, check_nfe_list, check_seed
from fewstep.samplers import ArtifactMeta, model_fingerprint, sample
from fewstep.tuning.dc.calibrate import (
    DEFAULT_ITERATIONS,
    DEFAULT_LR,
    DEFAULT_OBJECTIVE,
    DEFAULT_REFERENCE_NFE,
    OBJECTIVES,
    calibrate_dc,
)
from fewstep.eval.holdout import describe as describe_validation
from fewstep.samplers.dc_artifacts import DCRatios, fit_cpr
from fewstep.samplers.solvers.dc import DynamicCompensation
from fewstep.eval.compare import Method
from fewstep.eval.reference import ReferenceStore
from fewstep.infra.io import claim_identity, lock_directory, lock_work_folder
from fewstep.eval.testbeds import (
    DigitsTestbed,
    GMMTestbed,
    PipelineTestbed,
    Testbed,
    make_testbed,
    model_identity,
)

__all__ = ["CalibrateDCConfig", "run_calibrate_dc", "calibration_inputs", "add_calibrate_parser"]

_LOCK_HOLDER = "another fewstep calibrate dc"


@dataclass
class CalibrateDCConfig:
    """Settings of ``fewstep calibrate dc``; also the schema of its YAML files (``configs/calibrate/``).

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder (UNet pipelines).
        nfe: NFE(s) to calibrate.
        guidance: CFG scale(s); None: the model's default (<= 1: no guidance).
        grid: Calibrate every (NFE, guidance) pair and fit the CPR coefficients (out is a dc_cpr file).
        num_samples: Calibration (fit) samples (the paper uses 10).
        validation_samples: Samples held out of the fit (seeds right after the fit's) on which
            the objectives are compared and the result is checked against the base solver.
        objective: ``auto`` (both, the better on validation), ``trajectory`` (official, per
            step) or ``final`` (joint, final-sample MSE).
        keep_worse: Write the calibrated ratios even when they lose to the base solver on the
            validation samples (otherwise all-ones ratios, i.e. the base solver, are written).
        seed: First noise seed (sample i uses ``seed + i``).
        solver: ``dc`` or ``dc_dpmpp``, with options (``dc:order=3``).
        spacing: Timestep spacing; None: the model's own (the grid ``fewstep compare`` uses).
        iterations: Adam iterations per pair.
        lr: Adam learning rate.
        reference_nfe: Steps of the DDIM reference.
        batch_size: Samples per forward/backward pass; None: all at once.
        prompts, height, width: For pipelines, as in ``fewstep compare``.
        out: Output file (``.json`` or ``.yaml``).
        device, threads, progress: How to run.
    """

    model: str = "digits"
    nfe: List[int] = field(default_factory=lambda: [5])
    guidance: Optional[List[float]] = None
    grid: bool = False
    num_samples: int = 10
    validation_samples: int = 32
    objective: str = DEFAULT_OBJECTIVE
    keep_worse: bool = False
    seed: int = 100000
    solver: str = "dc"
    spacing: Optional[str] = None
    iterations: int = DEFAULT_ITERATIONS
    lr: float = DEFAULT_LR
    reference_nfe: int = DEFAULT_REFERENCE_NFE
    batch_size: Optional[int] = None
    prompts: Optional[List[str]] = None
    height: Optional[int] = None
    width: Optional[int] = None
    out: str = "runs/calibrate-dc/ratios.json"
    device: str = "cpu"
    threads: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        self.nfe = check_nfe_list(self.nfe, minimum=2)
        if self.guidance is not None:  # nan > 1 is False: it would silently run unguided
            self.guidance = check_guidance_list(self.guidance, minimum=0)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "auto" and self.validation_samples < 1:
            raise ValueError("objective auto chooses on validation samples: validation_samples must be >= 1")
        for key, low in (("num_samples", 1), ("validation_samples", 0), ("iterations", 0)):
            check_count(key, getattr(self, key), low)
        self.reference_nfe = check_nfe(self.reference_nfe, "reference_nfe")
        self.seed = check_seed(self.seed)
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        self.batch_size = check_count("batch_size", self.batch_size, optional=True)
        check_runtime_settings(self)
        if Path(self.out).suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"out={self.out!r} must end in .json or .yaml (a ratios or CPR file)")
        method = Method.parse(self.solver)
        from fewstep.samplers import get_solver

        if not isinstance(get_solver(method.solver, **method.option_dict), DynamicCompensation):
            raise ValueError(f"solver {self.solver!r} has no dynamic compensation; use dc or dc_dpmpp[:options]")
        if any(k in method.option_dict for k in ("ratios", "cpr", "dc_file", "guidance")):
            raise ValueError(f"solver {self.solver!r}: ratios/cpr/dc_file/guidance are what calibration finds or sets")
        if not self.grid and len(self.nfe) * len(self.guidance or [0]) > 1:
            raise ValueError("several NFE or guidance values need --grid (calibrate every pair and fit CPR)")

    @property
    def work_dir(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.stem + ".calibration")


class _Denoiser:
    """A testbed's network as ``model(x, t, cond)``, differentiable, fingerprinted by its weights."""

    def __init__(self, fn: Callable[..., torch.Tensor], module: torch.nn.Module):
        self.fn, self.module = fn, module

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.fn(x, t, cond)

    def fingerprint(self) -> str | None:
        return model_fingerprint(self.module)


def calibration_inputs(testbed: Testbed, guidance: float | None, num_samples: int, seed: int,
                       spacing: str | None) -> dict[str, Any]:
    """Keyword arguments of :func:`fewstep.calibrate_dc` for a testbed: a differentiable model,
    its noise, conditioning, schedule and the grid ``fewstep compare`` samples on.

    Raises:
        ValueError: a pipeline whose denoiser is not a conditional UNet (e.g. SD3).
    """
    from fewstep.eval.testbeds import common_grid

    guided = guidance is not None and guidance > 1
    x_T, labels = testbed.initial_noise(num_samples, seed)
    args: dict[str, Any] = dict(guidance=guidance if guided else None)
    schedule, prediction = getattr(testbed, "schedule", None), getattr(testbed, "prediction", None)
    grid = common_grid(spacing, schedule) if schedule is not None else None
    if isinstance(testbed, DigitsTestbed):
        unet = testbed.unet
        model = _Denoiser(lambda x, t, c: unet(x, t, class_labels=c).sample, unet)
        args.update(model=model, cond=labels, uncond=torch.full_like(labels, testbed.null_label) if guided else None)
    elif isinstance(testbed, GMMTestbed):
        args.update(model=testbed.model, cond=labels, uncond=torch.full_like(labels, -1) if guided else None)
    elif isinstance(testbed, PipelineTestbed):
        pipe = testbed.pipe
        if getattr(pipe, "unet", None) is None or not hasattr(pipe, "encode_prompt"):
            raise ValueError(f"calibrate dc supports UNet text-to-image pipelines (SD 1.x/2.x) and the built-in models; "
                             f"{testbed.path} has {type(pipe).__name__}")
        prompts = [testbed.prompts[int(i)] for i in labels]
        with torch.no_grad():
            cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, True)[:2]
        unet, dtype = pipe.unet, pipe.unet.dtype
        model = _Denoiser(lambda x, t, c: unet(x.to(dtype), t, encoder_hidden_states=c).sample.to(x.dtype), unet)
        args.update(model=model, cond=cond, uncond=uncond if guided else None)
        # The grid DCSolverScheduler.from_config(pipe.scheduler.config) samples on (VP configs).
        from fewstep.samplers.scheduler import DCSolverScheduler

        sched = DCSolverScheduler.from_config(testbed.base_config)
        schedule, prediction, grid = sched.schedule, sched.prediction, sched.grid_spec()
        grid = grid.replace(spacing=spacing) if spacing else grid
    else:
        raise ValueError(f"calibrate dc cannot drive a {type(testbed).__name__}")
    return dict(args, x_T=x_T.to(testbed.device), schedule=schedule, prediction=prediction, spacing=grid)


def _pair_name(nfe: int, guidance: float) -> str:
    return f"nfe{nfe}-g{guidance:g}"


def _identity(cfg: CalibrateDCConfig, testbed: Testbed) -> dict[str, Any]:
    from fewstep._version import __version__

    model = model_identity(cfg.model)
    method = Method.parse(cfg.solver)
    return {"fewstep": __version__, "model": model, "testbed": testbed.fingerprint(), "num_samples": cfg.num_samples,
            "validation_samples": cfg.validation_samples, "objective": cfg.objective, "keep_worse": cfg.keep_worse,
            "seed": cfg.seed, "solver": repr(method.canonical), "spacing": cfg.spacing, "iterations": cfg.iterations,
            "lr": cfg.lr, "reference_nfe": cfg.reference_nfe, "batch_size": cfg.batch_size, "prompts": cfg.prompts,
            "height": cfg.height, "width": cfg.width, "device": testbed.device.type}


def _reference(work: Path, cfg: CalibrateDCConfig, inputs: dict[str, Any], guidance: float,
               identity: dict[str, Any], log: Callable[[str], None]) -> torch.Tensor:
    """The DDIM reference of one guidance, kept in the work folder (computed once, in one batch)."""
    store = ReferenceStore({**identity, "reference_guidance": guidance}, "calibrate-dc", work, None, log,
                           stem=f"reference-g{guidance:g}")
    x_T = inputs["x_T"]
    run = {k: inputs[k] for k in ("schedule", "prediction", "spacing", "guidance")}

    def compute(chunk: slice) -> torch.Tensor:
        cond, uncond = (None if inputs[k] is None else inputs[k][chunk] for k in ("cond", "uncond"))
        with torch.no_grad():
            return sample(inputs["model"], x_T[chunk], solver="ddim", nfe=cfg.reference_nfe, cond=cond,
                          uncond=uncond, **run)

    description = f"ddim, {cfg.reference_nfe} steps, guidance {guidance:g}, on {x_T.shape[0]} samples"
    # One batch, as the calibration always computed it (the batch size can change the last bits).
    return store.get(x_T, compute, x_T.shape[0], description, x_T.device, progress=False)[0].to(x_T.device)


def run_calibrate_dc(testbed: Testbed, cfg: CalibrateDCConfig, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) a calibration and write ``cfg.out``.

    Returns:
        The path of the written ratios (single pair) or CPR (``grid``) file.

    Raises:
        ValueError: the work folder is in use or holds another configuration, or the grid
            cannot determine CPR (fewer than 3 NFEs or guidance scales, or scales <= 1).
    """
    guidances = cfg.guidance or [testbed.default_guidance]
    if cfg.grid and any(g <= 1 for g in guidances):
        raise ValueError(f"a CPR grid needs classifier-free guidance scales > 1, got {guidances}")
    pairs = list(itertools.product(cfg.nfe, guidances))
    work, out = cfg.work_dir, Path(cfg.out)
    method = Method.parse(cfg.solver)
    identity = _identity(cfg, testbed)
    with lock_work_folder(work, out, _LOCK_HOLDER):
        claim_identity(work / "identity.json", identity, "a calibration with other settings",
                       "choose another out or delete the folder")
        save_config(cfg, work)
        results: list[DCRatios] = []
        from tqdm.auto import tqdm

        for nfe, guidance in tqdm(pairs, desc="calibrate dc", unit="pair", disable=not cfg.progress or len(pairs) < 2):
            name = _pair_name(nfe, guidance)
            done = work / f"ratios-{name}.json"
            if done.exists():
                results.append(DCRatios.load(done))
                continue
            total = cfg.num_samples + cfg.validation_samples
            inputs = calibration_inputs(testbed, guidance, total, cfg.seed, cfg.spacing)
            ref = _reference(work, cfg, inputs, guidance, identity, log)
            with warnings.catch_warnings():  # the verdict is logged below, in one line
                warnings.simplefilter("ignore", UserWarning)
                ratios = calibrate_dc(**inputs, nfe=nfe, reference=ref, objective=cfg.objective,
                                      validation=cfg.validation_samples, keep_worse=cfg.keep_worse,
                                      iterations=cfg.iterations, lr=cfg.lr, solver=method.solver,
                                      batch_size=cfg.batch_size, checkpoint=work / f"state-{name}.json",
                                      progress=cfg.progress, **method.option_dict)
            e = ratios.meta.extra
            e.update(seed=cfg.seed, model=cfg.model, reference=f"ddim, {cfg.reference_nfe} steps")
            if "validation" in e:
                e["validation"].update(seeds=[cfg.seed + cfg.num_samples, cfg.seed + total])
            ratios.save(done)
            losses = "" if e.get("loss") is None else \
                f"; calibration MSE {e['loss_uncompensated']:.4g} -> {e['loss']:.4g}"
            log(f"{name}: objective {e['objective']}, ratios {[round(r, 4) for r in ratios.ratios]}{losses}")
            if "validation" in e:
                log(f"{name}: {describe_validation(e['validation'])}")
            results.append(ratios)
        if cfg.grid:
            first = results[0].meta
            cpr = fit_cpr(results, ArtifactMeta(fingerprint=first.fingerprint, schedule=first.schedule,
                                                 solver=first.solver, extra=dict(model=cfg.model, seed=cfg.seed,
                                                                                 num_samples=cfg.num_samples)))
            cpr.save(out)
            log(f"CPR fitted on {len(results)} pairs (rms {cpr.meta.extra['fit_rms']:.3g} in the ratios)")
        else:
            results[0].save(out)
    log(f"wrote {out} (work folder {work})")
    return out


_LIST = re.compile(r"^(nfe|guidance)=([^\[\]]*,[^\[\]]*)$")


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep calibrate dc``."""
    p = sub.add_parser("calibrate", help="tune solver artifacts for a model (dc: DC-Solver ratios / CPR)",
                       description="Tune solver artifacts for a model.")
    targets = p.add_subparsers(dest="calibrate_command", required=True, metavar="TARGET")
    d = targets.add_parser(
        "dc",
        help="DC-Solver compensation ratios (one NFE/guidance) or CPR coefficients (--grid)",
        description=(
            "Calibrate DC-Solver's compensation ratios on a few samples against a 200-step DDIM reference\n"
            "(objective trajectory: the official per-step fit to the DDIM trajectory; final: all ratios\n"
            "jointly on the final samples; auto: both, the better on validation samples), or with --grid\n"
            "every (NFE, guidance) pair and the 36 cascade-polynomial-regression coefficients. Ratios that\n"
            "do not beat the base solver on the validation samples are written as ones unless --keep-worse.\n"
            "Rerunning the same command resumes."
        ),
        epilog=(
            "Examples:\n"
            "  fewstep calibrate dc --model digits --nfe 5 --guidance 7.5 --num-samples 10 --out ratios.json\n"
            "  fewstep calibrate dc --grid nfe=5,6,8,10 guidance=2,4,7.5 --out cpr.json\n"
            "  fewstep calibrate dc --config configs/calibrate/dc-digits.yaml iterations=60\n"
            "Then: fewstep.sample(..., solver='dc', dc_file='ratios.json') or\n"
            "      fewstep.DCSolverScheduler.from_config(pipe.scheduler.config, dc_file='cpr.json', guidance=7.5)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    d.add_argument("--nfe", nargs="+", type=int, metavar="N", help="NFE (default: 5)")
    d.add_argument("--guidance", nargs="+", type=float, metavar="W", help="CFG scale (default: the model's)")
    d.add_argument("--grid", dest="grid", action="store_true",
                   help="calibrate every (nfe, guidance) pair and fit CPR; takes nfe=A,B,... guidance=A,B,...")
    d.add_argument("--num-samples", dest="num_samples", type=int, metavar="N", help="calibration samples (default: 10)")
    d.add_argument("--validation-samples", dest="validation_samples", type=int, metavar="N",
                   help="samples held out of the fit to choose the objective and to check the result against the "
                        "base solver (default: 32, seeds after the fit's)")
    d.add_argument("--objective", choices=list(OBJECTIVES),
                   help=f"trajectory (official, per step), final (joint, final-sample MSE) or auto: both, the better "
                        f"on validation (default: {DEFAULT_OBJECTIVE})")
    d.add_argument("--keep-worse", dest="keep_worse", action="store_true",
                   help="write the calibrated ratios even when they lose to the base solver on validation")
    d.add_argument("--seed", type=int, metavar="N", help="first noise seed (default: 100000)")
    d.add_argument("--solver", metavar="SPEC", help="dc (default) or dc_dpmpp, with options: dc:order=3")
    d.add_argument("--spacing", metavar="NAME", help="timestep spacing (default: the model's own)")
    d.add_argument("--iterations", type=int, metavar="N", help=f"Adam iterations (default: {DEFAULT_ITERATIONS})")
    d.add_argument("--lr", type=float, help=f"Adam learning rate (default: {DEFAULT_LR})")
    d.add_argument("--reference-nfe", dest="reference_nfe", type=int, metavar="N",
                   help=f"DDIM reference steps (default: {DEFAULT_REFERENCE_NFE})")
    d.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help="samples per pass (default: all)")
    d.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", help="pipeline prompt, repeatable")
    d.add_argument("--height", type=int, metavar="PX", help="pipeline image height")
    d.add_argument("--width", type=int, metavar="PX", help="pipeline image width")
    d.add_argument("--out", metavar="FILE", help="ratios or CPR file (default: runs/calibrate-dc/ratios.json)")
    add_runtime_arguments(d, model="digits (default), gmm, gmm-flow or a UNet pipeline folder")
    add_config_arguments(d, CalibrateDCConfig)
    d.set_defaults(func=cmd_calibrate_dc)


def cmd_calibrate_dc(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep calibrate dc``."""
    refuse_multiple_processes("calibrate dc")
    # --grid nfe=5,6,8 guidance=2,4: comma lists are accepted for the two grid keys.
    args.overrides = [f"{m.group(1)}=[{m.group(2)}]" if (m := _LIST.match(o)) else o
                      for o in getattr(args, "overrides", [])]
    cfg = resolve_config(CalibrateDCConfig, args)
    args.resume_hint = f"finished work is kept in {cfg.work_dir}; run the same command again to resume"
    with torch_threads(cfg.threads), lock_directory(cfg.work_dir, _LOCK_HOLDER):
        testbed = make_testbed(cfg.model, cfg.device, cfg.prompts, cfg.height, cfg.width)
        run_calibrate_dc(testbed, cfg)
    return 0
