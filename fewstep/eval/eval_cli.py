"""``fewstep eval``: FID/FD and MSE-to-reference benchmarks, reference statistics, FD between statistics files.

    fewstep eval fid --model digits --solver unipc --nfe 5 --guidance 3 --num-samples 1000 \\
        --extractor digits --ref digits --out DIR
    fewstep eval mse --model digits --solver ddim dpmpp unipc --nfe 5 6 8 10 --out DIR
    fewstep eval mse --model digits --solver dpmpp diffusers:DPMSolverMultistepScheduler --out DIR
    fewstep eval ref SOURCE --extractor inception --out ref.npz
    fewstep eval fd A.npz B.npz

``fid`` and ``mse`` run the same under ``torchrun --nproc_per_node N -m fewstep.cli eval ...`` (or
``accelerate launch``): the shards are split across processes and the result is identical.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import (add_cache_dir_argument, add_config_arguments, add_runtime_arguments, check_runtime_settings, resolve_config, resolve_device,
                      torch_threads)
from fewstep.infra.validation import check_count
from fewstep.eval.metrics.features import is_code_spec, parse_extractor_spec
from ..samplers.timesteps import SPACINGS
from fewstep.eval.testbeds import check_model
from .runner import DEFAULT_MSE_REFERENCE, DEFAULT_MSE_REFERENCE_NFE, FIDConfig, MSEConfig, run_fid, run_mse

__all__ = ["add_eval_parser", "RefConfig"]

_EPILOG = (
    "Settings can also come from a YAML file and key=value items (later wins):\n"
    "  defaults < --config FILE.yaml < flags < key=value\n"
    "  fewstep eval {cmd} --config configs/eval/{preset}.yaml num_samples=200 out=runs/x\n"
    "The resolved settings are saved as OUT/config.yaml. Rerunning the same command resumes."
)


@dataclass
class RefConfig:
    """Settings of ``fewstep eval ref``.

    Attributes:
        source: Built-in dataset (``digits``), image folder, or ``.npz`` of images / features.
        extractor: Feature extractor spec (see ``fewstep eval fid --help``).
        out: Statistics file to write (``.npz`` with mu, sigma, n, metadata).
        cache_dir: fewstep's cache folder, statistics in ``<cache_dir>/stats`` (where ``eval fid`` finds them);
            None: ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``.
        batch_size: Images per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        threads: Torch CPU threads.
        progress: Show a progress bar.
        allow_code: Let a settings file name an extractor as ``package.module:callable``
            (honoured from the command line only).
    """

    source: str = "digits"
    extractor: str = "digits"
    out: str = "ref.npz"
    cache_dir: Optional[str] = None
    batch_size: int = 100
    device: str = "cpu"
    threads: int = 1
    progress: bool = True
    allow_code: bool = False

    imports_code = staticmethod(lambda key, value: key == "extractor" and is_code_spec(value))

    def __post_init__(self) -> None:
        parse_extractor_spec(self.extractor)
        self.batch_size = check_count("batch_size", self.batch_size)
        check_runtime_settings(self)


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", "--solvers", dest="solvers", nargs="+", metavar="SPEC",
                   help="solvers, e.g. ddim unipc:order=3,variant=bh1, or diffusers schedulers built from the "
                        "model's scheduler config, e.g. diffusers:UniPCMultistepScheduler:solver_order=3 "
                        "(default: every registered solver)")
    p.add_argument("--nfe", nargs="+", type=int, metavar="N", help="model evaluations per sample (default: 5 6 8 10)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--num-samples", dest="num_samples", type=int, metavar="N",
                   help="samples per solver and NFE (default: 1000 digits, 16 pipelines)")
    p.add_argument("--seed", type=int, metavar="N", help="sample i uses noise seed SEED + i (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS, metavar="NAME", help=f"timestep spacing: {', '.join(SPACINGS)}")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="N",
                   help="samples per shard: the unit of resuming and of the split across processes "
                        "(default: 100 digits, 8 pipelines)")
    p.add_argument("--out", metavar="DIR", help="run folder")
    add_cache_dir_argument(p, "reference statistics in DIR/stats (fid) and references in DIR/mse-references (mse)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the metric-vs-NFE plot")
    add_runtime_arguments(p, distributed=True)


def _fid_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", metavar="SPEC",
                   help="digits (default), inception[:resize=clean,weights=FILE], dinov2:checkpoint=DIR, "
                        "clip:checkpoint=DIR or package.module:callable")
    p.add_argument("--ref", metavar="STATS|DATASET|DIR|NPZ",
                   help="reference statistics .npz, a built-in dataset (digits, the default), an image folder or "
                        "an .npz of images/features")


def _mse_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", metavar="SPEC",
                   help=f"reference solver (default: {DEFAULT_MSE_REFERENCE}, DPM-Solver++(2M) as in DPM-Solver-v3's "
                        "protocol; 'ddim' with --reference-nfe 999 is the other usual choice)")
    p.add_argument("--reference-nfe", dest="reference_nfe", type=int, metavar="N",
                   help=f"reference steps (default: {DEFAULT_MSE_REFERENCE_NFE})")


def _add_run_parser(esub: argparse._SubParsersAction, name: str, schema: type, run: Callable[[Any], Any],
                    own_flags: Callable[[argparse.ArgumentParser], None], help: str, description: str) -> None:
    """``fewstep eval fid`` / ``eval mse``: the shared flags, the metric's own, the settings file and the body."""
    p = esub.add_parser(name, help=help, description=description,
                        epilog=_EPILOG.format(cmd=name, preset=f"{name}-digits"),
                        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    _common_flags(p)
    own_flags(p)
    add_config_arguments(p, schema)
    p.set_defaults(func=_cmd_run(schema, run))


def _cmd_run(schema: type, run: Callable[[Any], Any]) -> Callable[[argparse.Namespace], int]:
    """CLI body of ``fewstep eval fid`` / ``eval mse``: resolve ``schema``, then ``run`` it."""

    def command(args: argparse.Namespace) -> int:
        cfg = resolve_config(schema, args)
        args.resume_hint = f"finished shards are kept in {cfg.out}; run the same command again to resume"
        check_model(cfg.model)  # a typo in --model fails before any weights are loaded
        with torch_threads(cfg.threads):
            run(cfg)
        return 0

    return command


def cmd_ref(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep eval ref``."""
    from fewstep.eval.metrics.features import build_extractor
    from fewstep.infra.io import cache_folder
    from fewstep.eval.metrics.refstats import reference_statistics

    cfg = resolve_config(RefConfig, args)
    name, options = parse_extractor_spec(cfg.extractor)

    with torch_threads(cfg.threads):
        extractor = build_extractor(name, options).to(resolve_device(cfg.device))
        stats = reference_statistics(cfg.source, extractor, cache_folder("stats", cfg.cache_dir), cfg.batch_size,
                                     progress=cfg.progress)
        stats.save(cfg.out)
    print(f"wrote {cfg.out}: {stats.n} samples, {stats.mu.shape[0]}-d {stats.metadata.get('extractor', '')} "
          "features".replace("  ", " "))
    return 0


def cmd_fd(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep eval fd``: the distance alone on the last line."""
    from fewstep.eval.metrics.stats import GaussianStats

    a, b = GaussianStats.load(args.a), GaussianStats.load(args.b)
    print(repr(a.frechet_distance(b)))
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep eval`` and its subcommands."""
    p = sub.add_parser("eval", help="FID/FD and MSE benchmarks of solvers, reference statistics, FD of two files",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    _add_run_parser(esub, "fid", FIDConfig, run_fid, _fid_flags,
                    help="Fréchet distance of samples to reference statistics, per solver and NFE",
                    description="Sample every solver at every NFE with per-sample seeds, extract features and report "
                                "the Fréchet distance to reference statistics, wall time and throughput.")
    _add_run_parser(esub, "mse", MSEConfig, run_mse, _mse_flags,
                    help="MSE to a high-NFE reference from the same noise, per solver and NFE",
                    description="MSE of every solver at every NFE to a reference trajectory from the same noise "
                                "(latents for latent models), with 95% confidence intervals.")

    r = esub.add_parser("ref", help="reference statistics (mu, sigma, metadata) of a dataset, folder or npz",
                        description="Compute reference statistics for FD/FID and write them as .npz (mu, sigma, n, "
                                    "metadata). Results are cached by content.",
                        formatter_class=fmt, argument_default=argparse.SUPPRESS)
    r.add_argument("source", nargs="?", metavar="SOURCE",
                   help="digits (built-in), an image folder, or an .npz with 'images' or 'features'")
    r.add_argument("--extractor", metavar="SPEC", help="feature extractor spec (default: digits)")
    r.add_argument("--out", metavar="FILE.npz", help="statistics file to write (default: ref.npz)")
    add_cache_dir_argument(r, "statistics in DIR/stats, where eval fid finds them")
    r.add_argument("--batch-size", dest="batch_size", type=int, metavar="N", help="images per forward pass")
    add_runtime_arguments(r, model=None)
    add_config_arguments(r, RefConfig)
    r.set_defaults(func=cmd_ref)

    d = esub.add_parser("fd", help="Fréchet distance between two statistics files (mu, sigma)",
                        description="Print the Fréchet distance between two .npz statistics files with keys mu and "
                                    "sigma (the number alone on the last line). Files without metadata are accepted; "
                                    "files whose metadata disagree (extractor, weights, resize) are refused.")
    d.add_argument("a", metavar="A.npz")
    d.add_argument("b", metavar="B.npz")
    d.set_defaults(func=cmd_fd)
