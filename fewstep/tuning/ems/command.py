"""``fewstep ems compute``: DPM-Solver-v3 statistics for the built-in models or a diffusers pipeline.

    fewstep ems compute --model digits --n-grid 250 --n-data 1024 --out ems.safetensors
    fewstep ems compute --model digits --guidance 7.5 --out ems-cfg7.5.safetensors
    torchrun --nproc_per_node 2 -m fewstep.cli ems compute --model PIPELINE_DIR --guidance 7.5 \\
        --prompts prompts.txt --out ems.safetensors --device cuda

Data (``data``): ``real`` uses the model's data (the digits dataset; exact samples of the
Gaussian mixture), ``samples`` uses the model's own samples (third-order DPM-Solver++ with
``sample_nfe`` steps, at the same guidance). Pipelines have no dataset, so they use samples.
All EMS seeds start at 100000, disjoint from the evaluation seeds 0..N-1. Chunks are saved
in ``OUT.parts/`` as they finish; rerunning the same command resumes, and the folder is
removed once the EMS file is written.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from fewstep.config import (
    add_config_arguments,
    add_runtime_arguments,
    check_runtime_settings,
    resolve_config,
    resolve_device,
    torch_threads,
)
from fewstep.infra.validation import check_count, check_guidance, check_nfe, check_nfe_list, check_seed
from fewstep.samplers import GridSpec, sample
from fewstep.samplers.artifacts import model_fingerprint
from fewstep.samplers.ems import EMS
from fewstep.tuning.ems.compute import EMS_DATA_SEED, TIME_DERIVATIVES, compute_ems
from fewstep.infra.distributed import ProcessGroup
from fewstep.infra.io import clean_temp_files
from fewstep.eval.testbeds import check_model, per_sample_noise, refuse_pipeline_settings

__all__ = ["EMSComputeConfig", "EMSSource", "ems_source", "run_ems_compute", "add_ems_parser", "DATA_MODES"]

DATA_MODES = ("real", "samples")
SAMPLE_SOLVER = dict(solver="dpmpp", order=3, third_order="taylor")


@dataclass
class EMSComputeConfig:
    """Settings of ``fewstep ems compute`` (also the schema of its YAML files, ``configs/ems/``).

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder.
        out: The EMS file to write.
        n_grid: N: grid points are N + 1, uniform in log-SNR over the whole schedule.
        n_data: K datapoints.
        guidance: CFG scale of the sampled function; None: the unconditional model (digits:
            null label). 1.0 is the conditional model without guidance.
        prompts: Text file with one prompt per line (pipelines; datapoint k uses prompt k mod P).
        data: ``real`` or ``samples``; None: real for digits/gmm, samples for pipelines.
        sample_nfe: Steps of the solver that makes the samples (``data=samples``).
        batch_size: Datapoints per model call (part of the result's identity).
        chunk_size: Grid points per saved chunk.
        seed: First EMS seed (datapoint k: data seed + k, noise and Rademacher from (seed, k)).
        height, width: Pipeline image size (default: the pipeline's own).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (under torchrun: ``cuda`` means each
            process's ``LOCAL_RANK`` GPU).
        threads: Torch CPU threads per process.
        time_derivative: ``auto`` (finite differences in time for discrete-time models, the
            digits UNet and DDPM/SD pipelines; forward AD for the continuous-time GMM and flow
            models), ``jvp`` or ``finite_difference`` (see :func:`fewstep.compute_ems`).
        fd_step: Half-width in log-SNR of the finite difference (None: the EMS grid spacing).
        progress: Show a progress bar.
        validation_samples: Built-in models: samples (seeds right after the EMS datapoints'; never
            the evaluation seeds) on which dpmv3 with the new EMS is checked against its base,
            DPM-Solver++ of the same order (0: no check). The figures go into the EMS metadata
            (``validation``), with the solver they recommend.
        validation_nfe: NFEs of that check.
    """

    model: str = "digits"
    out: Optional[str] = None
    n_grid: int = 250
    n_data: int = 1024
    guidance: Optional[float] = None
    prompts: Optional[str] = None
    data: Optional[str] = None
    sample_nfe: int = 100
    batch_size: int = 128
    chunk_size: int = 8
    seed: int = EMS_DATA_SEED
    height: Optional[int] = None
    width: Optional[int] = None
    device: str = "cpu"
    threads: int = 1
    time_derivative: str = "auto"
    fd_step: Optional[float] = None
    progress: bool = True
    validation_samples: int = 64
    validation_nfe: List[int] = field(default_factory=lambda: [5, 8])

    def __post_init__(self) -> None:
        self.validation_samples = check_count("validation_samples", self.validation_samples, 0)
        if self.validation_samples or self.validation_nfe:
            self.validation_nfe = check_nfe_list(self.validation_nfe, "validation_nfe")
        if not self.out:
            raise ValueError("out (the EMS file to write) is required: --out ems.safetensors")
        for key, low in (("n_grid", 1), ("n_data", 2), ("batch_size", 1), ("chunk_size", 1)):
            check_count(key, getattr(self, key), low)
        self.sample_nfe = check_nfe(self.sample_nfe, "sample_nfe")
        self.seed = check_seed(self.seed)
        if self.time_derivative not in TIME_DERIVATIVES:
            raise ValueError(f"time_derivative must be one of {', '.join(TIME_DERIVATIVES)}, got {self.time_derivative!r}")
        if self.data is not None and self.data not in DATA_MODES:
            raise ValueError(f"data must be one of {', '.join(DATA_MODES)}, got {self.data!r}")
        if self.guidance is not None:
            self.guidance = check_guidance(self.guidance, minimum=0)
        check_runtime_settings(self)


@dataclass
class EMSSource:
    """What compute_ems needs from a model: the function, its schedule, data and identity."""

    model: Callable[..., torch.Tensor]
    schedule: Any
    prediction: str
    shape: tuple[int, ...]
    fingerprint: str | None
    data_sampler: Callable[[torch.Tensor], Any]
    description: str


def _sampled(model, schedule, prediction, shape, cfg: EMSComputeConfig, conds: Callable, device) -> Callable:
    """A data sampler drawing the model's own samples (at the EMS guidance) from seeds seed + k."""
    guided = cfg.guidance is not None

    def sampler(indices: torch.Tensor):
        cond, uncond = conds(indices)
        x_T = per_sample_noise(shape, (cfg.seed + int(k) for k in indices)).to(device)
        x = sample(model, x_T, schedule=schedule, prediction=prediction,
                   nfe=cfg.sample_nfe, spacing=GridSpec(convention="multistep"), guidance=cfg.guidance if guided else None,
                   cond=cond, uncond=uncond if guided else None, **SAMPLE_SOLVER)
        return (x, cond, uncond) if guided else (x, cond)

    return sampler


def _digits_source(cfg: EMSComputeConfig, device, path: Path | None) -> EMSSource:
    from fewstep.zoo import digits
    from fewstep.eval.testbeds import DigitsTestbed

    bed = DigitsTestbed(device, path)
    unet, null = bed.unet, bed.null_label
    for p in unet.parameters():
        p.requires_grad_(False)

    def model(x, t, labels):
        return unet(x, t, class_labels=labels).sample

    guided = cfg.guidance is not None

    def conds(indices, labels=None):
        n = indices.numel()
        labels = (indices % digits.NUM_CLASSES) if labels is None else labels
        cond = labels.to(device) if guided else torch.full((n,), null, device=device)
        return cond, torch.full((n,), null, device=device)

    if cfg.data == "samples":
        data = _sampled(model, bed.schedule, bed.prediction, (1, 8, 8), cfg, conds, device)
        what = f"digits: own samples (dpmpp-3 taylor, {cfg.sample_nfe} steps, seeds {cfg.seed}+k)"
    else:
        images, labels = digits.load_digits_data("all")
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(cfg.seed))

        def data(indices):
            pick = perm[indices % images.shape[0]]
            cond, uncond = conds(indices, labels[pick])
            return (images[pick], cond, uncond) if guided else (images[pick], cond)

        what = f"digits: the 1797 real digits (permutation seed {cfg.seed})"
    return EMSSource(model, bed.schedule, bed.prediction, (1, 8, 8), model_fingerprint(unet), data, what)


def _gmm_source(cfg: EMSComputeConfig, flow: bool) -> EMSSource:
    from fewstep.eval.testbeds import GMMTestbed

    bed = GMMTestbed(schedule="flow" if flow else "linear")
    mix, guided = bed.mixture, cfg.guidance is not None

    def conds(indices):
        labels = indices % mix.num_classes
        return (labels, torch.full_like(labels, -1)) if guided else (None, None)

    if cfg.data == "samples":
        data = _sampled(bed.model, bed.schedule, bed.prediction, (mix.dim,), cfg, conds, "cpu")
        what = f"gmm: own samples (dpmpp-3 taylor, {cfg.sample_nfe} steps, seeds {cfg.seed}+k)"
    else:
        def data(indices):
            cond, uncond = conds(indices)
            x = torch.cat([mix.sample(1, torch.Generator().manual_seed(cfg.seed + int(k)),
                                      None if cond is None else cond[i:i + 1]) for i, k in enumerate(indices)])
            return (x, cond, uncond) if guided else (x if cond is None else (x, cond))

        what = f"gmm: exact mixture samples (seeds {cfg.seed}+k)"
    return EMSSource(bed.model, bed.schedule, bed.prediction, (mix.dim,), bed.model.fingerprint(), data, what)


def _read_prompts(path: str | None) -> list[str]:
    from fewstep.eval.testbeds import DEFAULT_PROMPTS

    if path is None:
        return list(DEFAULT_PROMPTS)
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts


def _pipeline_source(cfg: EMSComputeConfig, path: Path, device) -> EMSSource:
    from fewstep.samplers.scheduler import FewstepScheduler
    from fewstep.eval.testbeds import PipelineTestbed

    if cfg.data == "real":
        raise ValueError("a pipeline has no dataset here: use data=samples (the default for pipelines)")
    prompts = _read_prompts(cfg.prompts)
    bed = PipelineTestbed(path, prompts, cfg.height, cfg.width, device)  # loads and checks the folder and size
    pipe, shape = bed.pipe, bed.latent_shape
    sched = FewstepScheduler.from_config(bed.base_config)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{path}: only text-to-image pipelines with a unet or transformer are supported; "
                         "use fewstep.compute_ems with your own model function for others")
    for p in denoiser.parameters():
        p.requires_grad_(False)
    is_unet = getattr(pipe, "unet", None) is not None
    with torch.no_grad():  # one table of embeddings: row p is prompt p, the last row the empty prompt
        if is_unet:
            pos, neg = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[""] * len(prompts))
            table = (torch.cat([pos, neg[:1]]),)
        else:
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=device,
                                                              num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True, negative_prompt=[""] * len(prompts))
            table = (torch.cat([pos, neg[:1]]), torch.cat([pooled, neg_pooled[:1]]))
    empty = len(prompts)

    def conds(indices):  # conditioning is a prompt index, so batches concatenate like labels
        return (indices % len(prompts)).to(device), torch.full((indices.numel(),), empty, device=device)

    def model(x, t, idx):
        if is_unet:
            return denoiser(x, t, encoder_hidden_states=table[0][idx]).sample
        return denoiser(hidden_states=x, timestep=t, encoder_hidden_states=table[0][idx],
                        pooled_projections=table[1][idx]).sample

    data = _sampled(model, sched.schedule, sched.prediction, shape, cfg, conds, device)
    what = f"{path.name}: own latents (dpmpp-3 taylor, {cfg.sample_nfe} steps, seeds {cfg.seed}+k), {len(prompts)} prompts"
    return EMSSource(model, sched.schedule, sched.prediction, shape, model_fingerprint(pipe), data, what)


def ems_source(cfg: EMSComputeConfig, device: torch.device) -> EMSSource:
    """The model, schedule and data of ``cfg.model``.

    Raises:
        ValueError: unknown model or unusable folder, or a data mode the model lacks.
    """
    index = None if cfg.model in ("gmm", "gmm-flow") else check_model(cfg.model)
    if index is None or index["_class_name"] == "DigitsPipeline":  # settings the built-in models would ignore
        refuse_pipeline_settings(cfg.model, prompts=cfg.prompts, height=cfg.height, width=cfg.width)
    if cfg.model in ("gmm", "gmm-flow"):
        if device.type != "cpu":
            raise ValueError(f"the {cfg.model} model is exact and tiny and runs on the CPU only, not on {device}")
        return _gmm_source(cfg, cfg.model == "gmm-flow")
    if index is None or index["_class_name"] == "DigitsPipeline":
        return _digits_source(cfg, device, None if index is None else Path(cfg.model))
    return _pipeline_source(cfg, Path(cfg.model), device)


def run_ems_compute(cfg: EMSComputeConfig, log: Callable[[str], None] = print) -> EMS:
    """Compute (or resume) the EMS described by ``cfg`` and write it to ``cfg.out``."""
    group = ProcessGroup()  # torchrun / accelerate launch; the float64 sums are exchanged exactly on the CPU
    out = Path(cfg.out)
    parts = out.with_name(out.name + ".parts")
    try:
        device = group.device(str(resolve_device(cfg.device)))
        src = ems_source(cfg, device)
        start = time.perf_counter()
        ems = compute_ems(src.model, src.data_sampler, src.schedule, n_grid=cfg.n_grid, n_data=cfg.n_data,
                          prediction=src.prediction, guidance=cfg.guidance, batch_size=cfg.batch_size,
                          seed=cfg.seed, workdir=parts, chunk_size=cfg.chunk_size, device=device,
                          fingerprint=src.fingerprint, data_description=src.description,
                          time_derivative=cfg.time_derivative, fd_step=cfg.fd_step, progress=cfg.progress)
        seconds = time.perf_counter() - start
        if group.is_main:
            clean_temp_files(out.parent, name=out.name)  # of killed writers (OUT is outside the locked parts)
            record = validate_ems(cfg, ems, device, log)
            if record is not None:
                ems.meta.extra["validation"] = record
            ems.save(out)
            shutil.rmtree(parts, ignore_errors=True)
            t_hi, t_lo = ems.meta.extra["timesteps"]
            log(f"wrote {out}: EMS of {cfg.model} (N={cfg.n_grid}, K={cfg.n_data}, guidance={cfg.guidance}, "
                f"timesteps {t_lo:g}..{t_hi:g}, shape {ems.sample_shape}) in {seconds:.1f} s")
        return ems
    finally:
        group.close()


def validate_ems(cfg: EMSComputeConfig, ems: EMS, device: torch.device, log: Callable[[str], None]
                 ) -> dict[str, Any] | None:
    """dpmv3 with ``ems`` vs DPM-Solver++ (same order: 3 unconditional, 2 guided) on held-out seeds.

    The EMS is written either way (it is what was asked for); the record says which solver the
    figures recommend, and a loss is said in one line. Built-in models only (None otherwise).
    """
    if not cfg.validation_samples or cfg.model not in ("digits", "gmm", "gmm-flow"):
        return None
    from fewstep.eval.holdout import paired_ratio, validation_record
    from fewstep.eval.testbeds import make_testbed

    bed = make_testbed(cfg.model, str(device))
    first, n = cfg.seed + cfg.n_data, cfg.validation_samples
    x_T, labels = bed.initial_noise(n, first)
    guidance = cfg.guidance
    cond = labels if guidance is not None else torch.full_like(labels, bed.null_label if cfg.model == "digits" else -1)
    order = 3 if guidance is None else 2
    bs = bed.batch_size

    def run(fn) -> torch.Tensor:
        return torch.cat([fn(x_T[i:i + bs], cond[i:i + bs]) for i in range(0, n, bs)]).double()

    try:  # an EMS grid too coarse for an NFE: say so, no record
        for nfe in cfg.validation_nfe:
            bed.generate("dpmv3", {"ems": ems, "order": order}, nfe, x_T[:1], cond[:1], guidance, None)
    except (ValueError, FloatingPointError) as exc:
        log(f"validation skipped: dpmv3 with this EMS cannot run at NFE {nfe} ({exc})")
        return None
    ref = run(lambda x, c: bed.reference(x, c, guidance, None, "dpmpp", {"order": 3, "third_order": "taylor"}, 200))
    errors: dict[str, list[torch.Tensor]] = {"dpmv3": [], "dpmpp": []}
    by_nfe = {}
    for nfe in cfg.validation_nfe:
        for solver, options in (("dpmv3", {"ems": ems, "order": order}), ("dpmpp", {"order": order})):
            try:
                x = run(lambda xx, c: bed.generate(solver, options, nfe, xx, c, guidance, None))
                err = (x - ref).pow(2).flatten(1).mean(1)
            except FloatingPointError:
                err = torch.full((n,), float("inf"), dtype=torch.float64)
            errors[solver].append(err)
        by_nfe[str(nfe)] = list(paired_ratio(errors["dpmv3"][-1], errors["dpmpp"][-1]))
    record = validation_record(torch.cat(errors["dpmv3"]), torch.cat(errors["dpmpp"]),
                               tuned_label=f"dpmv3(order={order}) with this EMS", baseline_label=f"dpmpp(order={order})",
                               seeds=[first, first + n], keep_worse=True, nfe=list(cfg.validation_nfe),
                               ratio_by_nfe=by_nfe, pooled="per-sample errors of every NFE")
    record["recommended_solver"] = "dpmv3" if record["beats_baseline"] else "dpmpp"
    record["written"] = "ems"
    cells = ", ".join(f"NFE {k} {v[0]:.2f}x [{v[1]:.2f}, {v[2]:.2f}]" for k, v in by_nfe.items())
    verdict = "it beats its base" if record["beats_baseline"] else \
        "it does NOT beat its base on this model: prefer solver dpmpp (the EMS is written anyway)"
    log(f"validation: dpmv3/dpmpp MSE on {n} held-out samples (seeds {first}..{first + n - 1}): {cells}; {verdict}")
    return record


def add_ems_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep ems compute``."""
    ems = sub.add_parser("ems", help="DPM-Solver-v3 empirical model statistics",
                         description="Empirical model statistics (EMS) for the dpmv3 solver.")
    inner = ems.add_subparsers(dest="ems_command", required=True, metavar="SUBCOMMAND")
    p = inner.add_parser(
        "compute", help="compute EMS for a model (resumable, data-parallel under torchrun)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--out", metavar="FILE", help="the EMS file to write (required)")
    p.add_argument("--n-grid", dest="n_grid", type=int, metavar="N", help="grid intervals N (default: 250)")
    p.add_argument("--n-data", dest="n_data", type=int, metavar="K", help="datapoints K (default: 1024)")
    p.add_argument("--guidance", type=float, metavar="W", help="CFG scale (default: the unconditional model)")
    p.add_argument("--prompts", metavar="FILE", help="pipeline prompts, one per line (default: four built-in ones)")
    p.add_argument("--data", choices=DATA_MODES, help="real data or the model's own samples (default: per model)")
    p.add_argument("--sample-nfe", dest="sample_nfe", type=int, metavar="N", help="steps for data=samples (default: 100)")
    p.add_argument("--batch-size", dest="batch_size", type=int, metavar="B", help="datapoints per call (default: 128)")
    p.add_argument("--chunk-size", dest="chunk_size", type=int, metavar="C", help="grid points per saved chunk (default: 8)")
    p.add_argument("--seed", type=int, metavar="S", help=f"first EMS seed (default: {EMS_DATA_SEED})")
    p.add_argument("--height", type=int, metavar="PX", help="pipeline image height")
    p.add_argument("--width", type=int, metavar="PX", help="pipeline image width")
    add_runtime_arguments(p, distributed=True)
    p.add_argument("--time-derivative", dest="time_derivative", choices=TIME_DERIVATIVES,
                   help="explicit time dependence: finite differences (discrete-time models, the default there) or "
                        "forward AD (default: auto)")
    p.add_argument("--fd-step", dest="fd_step", type=float, metavar="H",
                   help="finite-difference half-width in log-SNR (default: the EMS grid spacing)")
    p.add_argument("--validation-samples", dest="validation_samples", type=int, metavar="N",
                   help="built-in models: held-out samples checking dpmv3 against dpmpp (default: 64; 0: skip)")
    p.add_argument("--validation-nfe", dest="validation_nfe", nargs="+", type=int, metavar="N",
                   help="NFEs of that check (default: 5 8)")
    add_config_arguments(p, EMSComputeConfig)
    p.set_defaults(func=cmd_ems_compute)


def cmd_ems_compute(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep ems compute``."""
    cfg = resolve_config(EMSComputeConfig, args)
    args.resume_hint = f"finished chunks are kept in {cfg.out}.parts; run the same command again to resume"
    with torch_threads(cfg.threads):
        run_ems_compute(cfg)
    return 0
