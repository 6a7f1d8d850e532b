"""``fewstep eval fid`` and ``fewstep eval mse``: sharded, resumable, distributed solver benchmarks.

Both sample every (solver, NFE) pair on fixed shards of ``batch_size`` samples (sample i uses
noise seed ``seed + i`` and condition ``i mod classes``), so the shards, and every number
computed from them, are the same for any process count and any interruption:

* ``fid``: each shard's features go to ``OUT/shards/<solver>-nfe<N>/``; the Fréchet distance
  to the reference statistics comes from float64 feature sums keyed by sample index
  (:class:`~fewstep.eval.metrics.stats.FeatureStatistics`), merged across processes on rank 0.
* ``mse``: each shard's per-sample MSE (float64) to a high-NFE reference from the same noise
  goes to the run folder; reference shards are cached under ``cache_dir``. The table gives the
  mean and a 95% confidence interval (normal approximation, ``1.96 * std / sqrt(n)``).

A killed run resumes from its finished shards. Under ``torchrun`` / ``accelerate launch`` shard
k runs on rank ``k % world_size``; rank 0 holds the run folder's lock and writes the reports
(``results.json``, ``results.md``, ``<metric>_vs_nfe.png``, ``samples.png``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
import torch

from ..config import save_config
from ..samplers import list_solvers, solver_class
from .compare import Method, check_sampling_settings
from fewstep.infra.distributed import ProcessGroup
from fewstep.eval.metrics.features import (
    as_float_images,
    build_extractor,
    extract_features,
    is_code_spec,
    parse_extractor_spec,
)
from fewstep.infra.io import (
    atomic_write_bytes,
    cache_folder,
    claim_identity,
    clean_temp_files,
    lock_directory,
    read_json,
    write_json,
)
from .reference import timed
from .report import pivot_tables, plot_quality, sample_grid, tuned_notes
from fewstep.infra.shards import ShardStore, identity_digest, shard_ranges
from fewstep.infra.validation import check_count, check_reference_nfe
from fewstep.eval.metrics.refstats import BUILTIN_DATASETS, load_source, real_vs_real, reference_statistics
from fewstep.eval.metrics.stats import FeatureStatistics, GaussianStats, check_compatible
from fewstep.eval.testbeds import PipelineTestbed, Testbed, make_testbed, model_identity

__all__ = ["EvalConfig", "FIDConfig", "MSEConfig", "run_fid", "run_mse", "runnable_solvers", "DEFAULT_MSE_REFERENCE"]

# DPM-Solver-v3's protocol: 200-step multistep DPM-Solver++ (2M) from the same noise.
DEFAULT_MSE_REFERENCE = "dpmpp"
DEFAULT_MSE_REFERENCE_NFE = 200
GRID_SAMPLES = 10
Z95 = 1.959963984540054
_LOCK_HOLDER = "another fewstep eval"


@dataclass
class EvalConfig:
    """Settings shared by ``fewstep eval fid`` and ``fewstep eval mse`` (``None``: the model's default).

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder.
        solvers: Solver specs (``unipc:order=3,variant=bh1``) or diffusers schedulers
            (``diffusers:DPMSolverMultistepScheduler:solver_order=3``, built from the model's scheduler
            config); None: every registered solver that needs no tuned file (:func:`runnable_solvers`).
        nfe: Model evaluations per sample.
        num_samples: Samples per (solver, NFE).
        seed: Sample i uses noise seed ``seed + i``.
        guidance: Classifier-free guidance scale (<= 1: none).
        spacing: Timestep spacing for every solver; None: the model's own.
        batch_size: Samples per shard (the unit of resuming and of work split across processes).
        out: Run folder.
        cache_dir: fewstep's cache folder (``stats/``: reference statistics, ``mse-references/``: MSE
            references); None: ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``.
        device: ``cpu``, ``cuda`` (each process its ``LOCAL_RANK`` GPU), ``cuda:N`` or ``mps``.
        threads: Torch CPU threads per process.
        plot: Write the metric-vs-NFE plot.
        progress: Show a progress bar (rank 0).
    """

    model: str = "digits"
    solvers: Optional[List[str]] = None
    nfe: List[int] = field(default_factory=lambda: [5, 6, 8, 10])
    num_samples: Optional[int] = None
    seed: int = 0
    guidance: Optional[float] = None
    spacing: Optional[str] = None
    batch_size: Optional[int] = None
    out: str = "runs/eval"
    cache_dir: Optional[str] = None
    device: str = "cpu"
    threads: int = 1
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_sampling_settings(self)
        self.batch_size = check_count("batch_size", self.batch_size, optional=True)
        specs = list_solvers(runnable=True) if self.solvers is None else self.solvers
        methods = [m for m, _ in Method.parse_unique(specs)]
        if not methods:
            raise ValueError("no solvers to evaluate")
        self._methods = methods

    @property
    def methods(self) -> list[Method]:
        return list(self._methods)

    def with_defaults(self, testbed: Testbed) -> "EvalConfig":
        filled = dict(num_samples=testbed.default_num_samples, guidance=testbed.default_guidance,
                      spacing=testbed.default_spacing, batch_size=testbed.batch_size)
        return replace(self, **{k: v for k, v in filled.items() if getattr(self, k) is None})

    def identity(self, testbed: Testbed) -> dict[str, Any]:
        """What the run folder's shards and results are keyed by (not the solver and NFE lists)."""
        from fewstep._version import __version__

        model = model_identity(self.model)
        return {"fewstep": __version__, "model": model, "testbed": testbed.fingerprint(),
                "num_samples": self.num_samples, "seed": self.seed, "guidance": self.guidance, "spacing": self.spacing,
                "batch_size": self.batch_size, "device": testbed.device.type}


@dataclass
class FIDConfig(EvalConfig):
    """Settings of ``fewstep eval fid`` (schema of ``configs/eval/fid-*.yaml``).

    Attributes:
        extractor: Feature extractor spec: ``digits``, ``inception:resize=clean,weights=FILE``,
            ``dinov2:checkpoint=DIR``, ``clip:checkpoint=DIR`` or ``package.module:callable``.
        ref: Reference: a statistics ``.npz`` (mu, sigma), a built-in dataset (``digits``), an
            image folder or an ``.npz`` of images / features (their statistics are cached).
        allow_code: Let a settings file name the extractor as ``package.module:callable``
            (honoured from the command line only).
    """

    extractor: str = "digits"
    ref: str = "digits"
    out: str = "runs/eval-fid"
    allow_code: bool = False

    imports_code = staticmethod(lambda key, value: key == "extractor" and is_code_spec(value))

    def __post_init__(self) -> None:
        super().__post_init__()
        self._extractor = parse_extractor_spec(self.extractor)


@dataclass
class MSEConfig(EvalConfig):
    """Settings of ``fewstep eval mse`` (schema of ``configs/eval/mse-*.yaml``).

    Attributes:
        reference: Solver spec of the reference trajectory (``ddim`` with 999 steps is the other
            common choice; a ``diffusers:`` spec works too; the GMM testbed uses its exact ODE solution).
        reference_nfe: Steps of the reference.
    """

    reference: str = DEFAULT_MSE_REFERENCE
    reference_nfe: int = DEFAULT_MSE_REFERENCE_NFE
    out: str = "runs/eval-mse"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._reference = Method.parse(self.reference)
        self.reference_nfe = check_reference_nfe(self.reference_nfe, self.nfe)


def runnable_solvers() -> tuple[list[str], dict[str, str]]:
    """:func:`fewstep.list_solvers` with ``runnable=True``, and why the others are left out.

    Returns:
        ``(names, {skipped name: reason})``.
    """
    names = list_solvers(runnable=True)
    skipped = {}
    for name in sorted(set(list_solvers()) - set(names)):
        cls = solver_class(name)
        tuned = [k for k, o in cls.options.items() if o.kind == "artifact" and o.default is None
                 and (k != "solver_schedule" or cls.runs_step_strategies)]  # every solver takes tuned timesteps
        try:
            cls()
            reason = "without a tuned file it is a simpler solver"
        except ValueError as exc:
            reason = str(exc)
        skipped[name] = f"{reason} (tuned-file option: {', '.join(tuned) or 'none'})"
    return names, skipped




class _Run:
    """The parts both commands share: process group, testbed, lock, identity, shard loop, reports."""

    def __init__(self, cfg: EvalConfig, kind: str, extra_identity: Callable[[Testbed], dict], log,
                 check: Callable[[Testbed], None] = lambda testbed: None):
        self.group = ProcessGroup()
        self.log = log if self.group.is_main else (lambda *_: None)
        self.kind = kind
        self.stack = contextlib.ExitStack()
        try:
            self._setup(cfg, extra_identity, check)
        except BaseException:
            self.close()  # release the folder lock and the process group
            raise

    def _setup(self, cfg: EvalConfig, extra_identity: Callable[[Testbed], dict], check) -> None:
        self.testbed = make_testbed(cfg.model, self.group.device(cfg.device))
        check(self.testbed)  # before the run folder is created
        self.cfg = cfg.with_defaults(self.testbed)
        for m in self.cfg.methods:  # diffusers schedulers: the model's config accepts them, every NFE is reachable
            self.testbed.check_solver(m.solver, m.option_dict, self.cfg.nfe, self.cfg.spacing)
        self.out = Path(self.cfg.out)
        identity = {**self.cfg.identity(self.testbed), "kind": self.kind, **extra_identity(self.testbed)}
        self.identity = json.loads(json.dumps(identity))  # as run.json will read back (tuples become lists)
        self.ranges = shard_ranges(self.cfg.num_samples, self.cfg.batch_size)
        self.mine = self.group.mine(len(self.ranges))
        self.pairs = [(m, n) for m in self.cfg.methods for n in self.cfg.nfe]
        self.group.on_main(self._claim_folder)

    def _claim_folder(self) -> None:
        self.stack.enter_context(lock_directory(self.out, _LOCK_HOLDER))
        clean_temp_files(self.out, all_stale=True)  # results.json, plots... of a killed run (shards clean their own)
        run_file = self.out / "run.json"
        if run_file.exists():
            old = read_json(run_file)
            if not isinstance(old, dict) or old.get("kind") != self.kind:
                raise ValueError(f"{run_file} is not a fewstep eval {self.kind} run; choose another output folder")
        claim_identity(run_file, self.identity, "a run of a different configuration",
                       "choose another output folder or delete it")
        save_config(self.cfg, self.out)

    def store(self, method: Method, nfe: int) -> ShardStore:
        return ShardStore(self.out / "shards" / f"{method.slug}-nfe{nfe}",
                          {**self.identity, **_method_identity(method), "nfe": nfe}, self.log)

    def loop(self, compute_shard: Callable[[int, int, list], None], stores: dict,
             extra: Callable[[dict[int, list]], int] = lambda todo: 0) -> None:
        """Run ``compute_shard(start, stop, todo_pairs)`` for this process's shards with unfinished pairs.

        ``extra(todo)``: further units of work the bar counts (the MSE reference's shards).
        """
        from tqdm.auto import tqdm

        todo = {k: [p for p in self.pairs if not stores[p].path(*self.ranges[k]).exists()] for k in self.mine}
        total = sum(len(v) for v in todo.values()) + extra(todo)
        done = len(self.mine) * len(self.pairs) - total
        if done:
            self.log(f"resuming: {done} finished shard(s) of {len(self.ranges) * len(self.pairs)} found in {self.out}")
        with tqdm(total=total, desc=f"eval {self.kind}", unit="shard", disable=not (self.cfg.progress
                                                                                  and self.group.is_main and total)) as bar:
            for k in self.mine:
                compute_shard(*self.ranges[k], todo[k], bar)

    def warm_up(self, method: Method, nfe: int, x_T, cond) -> None:
        """One untimed sample before the first timed shard: the model's first call pays one-time
        costs (lazy initialisation, allocator, kernel selection) that no solver should be charged."""
        if getattr(self, "_warm", False):
            return
        self._warm = True
        try:
            self.testbed.generate(method.solver, method.option_dict, nfe, x_T[:1], cond[:1], self.cfg.guidance,
                                  self.cfg.spacing)
        except (FloatingPointError, ValueError):  # the timed call reports what is wrong
            pass

    def generate(self, method: Method, nfe: int, x_T, cond) -> tuple[torch.Tensor | None, float]:
        """Samples of one shard (None when the solver diverged) and their wall time."""
        cfg = self.cfg
        self.warm_up(method, nfe, x_T, cond)
        try:
            samples, seconds = timed(lambda: self.testbed.generate(method.solver, method.option_dict, nfe, x_T, cond,
                                                                   cfg.guidance, cfg.spacing), self.testbed.device)
        except FloatingPointError:
            return None, 0.0
        return (samples if bool(torch.isfinite(samples).all()) else None), seconds

    def grid_pixels(self, samples: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """The first samples' images, kept in shard 0 for the sample grid."""
        if start != 0:
            return {}
        pixels = self.testbed.pixels(samples[:GRID_SAMPLES])
        return {} if pixels is None else {"grid": pixels}

    def report(self, results: dict, metrics: tuple[str, ...], plotted: str, top: torch.Tensor | None,
               top_label: str, grids: dict, notes: list[str]) -> None:
        """Write results.json, results.md, the plot and the grid (rank 0)."""
        out, written = self.out, []
        write_json(out / "results.json", results)
        cfg = results["config"]
        lines = [f"# fewstep eval {self.kind}: {cfg['model']}", "",
                 f"{cfg['num_samples']} samples per solver and NFE (sample i: seed {cfg['seed']} + i), guidance "
                 f"{cfg['guidance']}, spacing `{cfg['spacing'] or 'model default'}`, shards of {cfg['batch_size']}, "
                 f"device {cfg['device']}, {results['processes']} process(es).", *notes, "",
                 pivot_tables(results, metrics), ""]
        notes_tuned = tuned_notes(self.cfg.methods)
        lines += notes_tuned
        diverged = [f"{e['method']} at NFE {e['nfe']}" for e in results["entries"] if e["diverged"]]
        if diverged:
            lines.append("Diverged (no finite samples): " + ", ".join(diverged) + ".")
        atomic_write_bytes(out / "results.md", "\n".join(lines).encode())
        written += ["results.json", "results.md"]
        if self.cfg.plot:
            if plot_quality(results, out / f"{plotted}_vs_nfe.png", (plotted,), f"fewstep eval {self.kind}"):
                written.append(f"{plotted}_vs_nfe.png")
            else:
                self.log("matplotlib is not installed: skipped the plot (pip install 'fewstep[plot]')")
        if top is not None and top.shape[1] == 1:
            rows = [(m.label, {n: "diverged" if grids.get((m.label, n)) is None else grids[(m.label, n)][:, 0]
                               for n in self.cfg.nfe}) for m in self.cfg.methods]
            sample_grid(top[:, 0], rows, out / "samples.png", reference_label=top_label)
            written.append("samples.png")
        self.log("")
        self.log(pivot_tables(results, metrics))
        for line in notes_tuned:
            self.log(line)
        self.log(f"\nwrote {out}{os.sep}: {', '.join(written)}")

    def close(self) -> None:
        self.stack.close()
        self.group.close()


def _method_identity(method: Method) -> dict[str, Any]:
    ident = {"method": method.label, "canonical": method.canonical}
    if method.is_diffusers:  # its numbers are diffusers' code: a new release is a new run
        import diffusers

        ident["diffusers"] = diffusers.__version__
    return ident


def _entry(method: Method, nfe: int, **values: Any) -> dict[str, Any]:
    return {"method": method.label, "solver": method.solver, "options": method.option_dict, "nfe": nfe, **values}


def run_fid(cfg: FIDConfig, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run (or resume) ``fewstep eval fid``; returns the results on rank 0, None on other ranks.

    Raises:
        ValueError: a non-image model, an unusable reference, a run folder in use or holding
            another configuration.
        FileNotFoundError: the extractor's weights are missing (the message says what to put where).
    """
    name, options = cfg._extractor
    extractor = build_extractor(name, options)
    meta = extractor.metadata()  # hashes the weights: once
    run = _Run(cfg, "fid", lambda tb: {"extractor": meta, "ref": cfg.ref}, log,
               lambda tb: _check_images(tb, extractor))
    try:
        return _run_fid(run, extractor.to(run.testbed.device), meta)
    finally:
        run.close()


def _check_images(testbed: Testbed, extractor) -> None:
    pixels = testbed.pixels(testbed.initial_noise(1, 0)[0])
    if pixels is None:
        raise ValueError(f"fewstep eval fid needs an image model; {testbed.name!r} has no images "
                         "(use fewstep eval mse or fewstep compare)")
    try:  # the model's image size through the extractor, before any sampling
        extract_features(extractor.to(testbed.device), pixels.to(testbed.device), batch_size=1)
    except (ValueError, RuntimeError) as exc:
        model = Path(str(getattr(testbed, "path", testbed.name))).name
        raise ValueError(f"the {extractor.name} extractor cannot read the {'x'.join(map(str, pixels.shape[1:]))} "
                         f"images of {model} ({' '.join(str(exc).split())}); choose an --extractor (e.g. inception) "
                         "and a --ref of that kind of image") from None


def _run_fid(run: _Run, extractor, meta: dict[str, Any]) -> dict[str, Any] | None:
    cfg, testbed = run.cfg, run.testbed
    started = time.perf_counter()
    ref_holder: dict[str, GaussianStats] = {}

    def reference() -> None:
        ref = ref_holder["stats"] = _reference_stats(cfg, extractor, run.log)
        # Compatibility is checked before any sampling, not after an hour of it.
        dim = extractor.feature_dim or ref.mu.shape[0]
        check_compatible(GaussianStats(np.zeros(dim), np.zeros((dim, dim)), metadata=meta,
                                       source=f"the {extractor.name} features of the samples"), ref)

    run.group.on_main(reference)
    stores = {p: run.store(*p) for p in run.pairs}
    stats = {p: FeatureStatistics() for p in run.pairs}
    info = {p: {"gen_s": 0.0, "feat_s": 0.0, "diverged": False, "grid": None} for p in run.pairs}

    def shard(start, stop, todo, bar):
        x_T, cond = testbed.initial_noise(stop - start, cfg.seed, start)
        for p in run.pairs:
            found = None if p in todo else stores[p].load(start, stop, ())
            if found is None:
                bar.set_postfix_str(f"{p[0].label} NFE {p[1]} samples {start}-{stop - 1}")
                samples, gen_s = run.generate(*p, x_T, cond)
                tensors, feat_s = {}, 0.0
                if samples is not None:
                    pixels = testbed.pixels(samples)
                    feats, feat_s = timed(lambda: extract_features(extractor, pixels, batch_size=stop - start),
                                          testbed.device)
                    tensors = {"features": feats.float(), **run.grid_pixels(samples, start)}
                stores[p].save(start, stop, {"diverged": torch.tensor(samples is None), **tensors},
                               gen_s=gen_s, feat_s=feat_s)
                found = stores[p].load(start, stop, ())  # the numbers always come from the file
                if p in todo:
                    bar.update()
            tensors, extra = found
            info[p]["gen_s"] += extra["gen_s"]
            info[p]["feat_s"] += extra["feat_s"]
            if bool(tensors["diverged"]):
                info[p]["diverged"] = True
            else:
                stats[p].update(tensors["features"], start=start)
                if "grid" in tensors:
                    info[p]["grid"] = tensors["grid"]

    run.loop(shard, stores)
    gathered = run.group.gather({p_key(p): (stats[p].state_dict(), info[p]) for p in run.pairs})
    if gathered is None:
        return None
    ref = ref_holder["stats"]
    entries, grids = [], {}
    for m, n in run.pairs:
        merged, gen_s, feat_s, diverged = FeatureStatistics(), 0.0, 0.0, False
        for part in gathered:
            state, part_info = part[p_key((m, n))]
            merged.merge(FeatureStatistics.from_state_dict(state))
            gen_s += part_info["gen_s"]
            feat_s += part_info["feat_s"]
            diverged |= part_info["diverged"]
            if part_info["grid"] is not None:
                grids[(m.label, n)] = part_info["grid"]
        fd = None
        if not diverged:
            mu, sigma = merged.result()
            fd = GaussianStats(mu.numpy(), sigma.numpy(), merged.count, meta,
                               f"{m.label} NFE {n}").frechet_distance(ref)
        entries.append(_entry(m, n, fd=fd, diverged=diverged, gen_s=gen_s, feat_s=feat_s,
                              samples_per_s=cfg.num_samples / gen_s if gen_s and not diverged else None,
                              features_per_s=cfg.num_samples / feat_s if feat_s and not diverged else None))
    fd_name = "FID" if extractor.name == "inception" else f"FD ({extractor.name})"
    floor = real_vs_real(cfg.ref, extractor)  # the plot's "real vs real data" line, as compare draws it
    results = {"config": run.identity, "fd_name": fd_name, "processes": run.group.world_size,
               "reference": {"description": cfg.ref, "n": ref.n}, "floor": {} if floor is None else {"fd": floor},
               "entries": entries, "wall_s": time.perf_counter() - started}
    top, label = None, "reference"
    if cfg.ref in BUILTIN_DATASETS:
        top, label = as_float_images(load_source(cfg.ref)[1][:GRID_SAMPLES]), f"real data ({cfg.ref})"
    notes = [f"{fd_name} against `{cfg.ref}` ({ref.n or '?'} reference samples), extractor "
             f"`{extractor.name}`. Times are summed over processes and shards (resumed shards keep theirs)."]
    if floor is not None:
        notes.append(f"Real data against itself (the two halves of `{cfg.ref}`): {fd_name} {floor:.4g}.")
    run.report(results, ("fd", "samples_per_s", "features_per_s", "gen_s"), "fd", top, label, grids, notes)
    return results


def p_key(p: tuple[Method, int]) -> str:
    return f"{p[0].label}@{p[1]}"


def _reference_stats(cfg: FIDConfig, extractor, log) -> GaussianStats:
    return reference_statistics(cfg.ref, extractor, cache_folder("stats", cfg.cache_dir), log=log, progress=cfg.progress)


def run_mse(cfg: MSEConfig, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run (or resume) ``fewstep eval mse``; returns the results on rank 0, None on other ranks.

    Raises:
        ValueError: a diverged reference, a run folder in use or holding another configuration.
    """
    ref_method = cfg._reference

    def check(testbed: Testbed) -> None:
        testbed.check_solver(ref_method.solver, ref_method.option_dict, [cfg.reference_nfe],
                             cfg.spacing or testbed.default_spacing)

    ref_identity = {"reference": ref_method.label, "reference_canonical": ref_method.canonical,
                    "reference_nfe": cfg.reference_nfe}
    run = _Run(cfg, "mse", lambda tb: ref_identity if not ref_method.is_diffusers else
               {**ref_identity, "reference_diffusers": _method_identity(ref_method)["diffusers"]}, log, check)
    try:
        return _run_mse(run, ref_method)
    finally:
        run.close()


def _run_mse(run: _Run, ref_method: Method) -> dict[str, Any] | None:
    cfg, testbed = run.cfg, run.testbed
    started = time.perf_counter()
    ref_identity = {k: v for k, v in run.identity.items() if k not in ("num_samples", "batch_size", "kind")}
    description = testbed.reference_description(ref_method.label, cfg.reference_nfe)
    ref_store = ShardStore(cache_folder("mse-references", cfg.cache_dir) / identity_digest(ref_identity), ref_identity, run.log)
    stores = {p: run.store(*p) for p in run.pairs}
    errors = {p: {} for p in run.pairs}
    info = {p: {"gen_s": 0.0, "diverged": False, "grid": None} for p in run.pairs}
    ref_info = {"time_s": 0.0, "grid": None}

    def reference(start, stop, x_T, cond, bar) -> torch.Tensor:
        found = ref_store.load(start, stop, ("x",))
        if found is None:
            bar.set_postfix_str(f"reference samples {start}-{stop - 1}")
            try:
                x, seconds = timed(lambda: testbed.reference(x_T, cond, cfg.guidance, cfg.spacing, ref_method.solver,
                                                             ref_method.option_dict, cfg.reference_nfe), testbed.device)
            except FloatingPointError as exc:
                raise ValueError(f"the reference ({description}) diverged: {exc}") from None
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"the reference ({description}) is not finite; check the model and the guidance")
            ref_store.save(start, stop, {"x": x.float()}, time_s=seconds)
            found = ref_store.load(start, stop, ("x",))
            bar.update()
        ref_info["time_s"] += found[1]["time_s"]
        if start == 0:
            ref_info["grid"] = testbed.pixels(found[0]["x"][:GRID_SAMPLES])
        return found[0]["x"]

    def shard(start, stop, todo, bar):
        x_T, cond = testbed.initial_noise(stop - start, cfg.seed, start)
        ref = reference(start, stop, x_T, cond, bar) if todo or start == 0 else None
        for p in run.pairs:
            found = None if p in todo else stores[p].load(start, stop, ())
            if found is None:
                if ref is None:
                    ref = reference(start, stop, x_T, cond, bar)
                bar.set_postfix_str(f"{p[0].label} NFE {p[1]} samples {start}-{stop - 1}")
                samples, gen_s = run.generate(*p, x_T, cond)
                tensors = {}
                if samples is not None:
                    err = (samples.double() - ref.double()).pow(2).flatten(1).mean(1)
                    tensors = {"mse": err, **run.grid_pixels(samples, start)}
                stores[p].save(start, stop, {"diverged": torch.tensor(samples is None), **tensors}, gen_s=gen_s)
                found = stores[p].load(start, stop, ())
                if p in todo:
                    bar.update()
            tensors, extra = found
            info[p]["gen_s"] += extra["gen_s"]
            if bool(tensors["diverged"]):
                info[p]["diverged"] = True
            else:
                errors[p][start] = tensors["mse"]
                if "grid" in tensors:
                    info[p]["grid"] = tensors["grid"]

    def reference_shards(todo: dict[int, list]) -> int:  # computed inside the loop: counted by its bar
        return sum(1 for k, pairs in todo.items() if (pairs or run.ranges[k][0] == 0)
                   and not ref_store.path(*run.ranges[k]).exists())

    run.loop(shard, stores, reference_shards)
    gathered = run.group.gather(({p_key(p): (errors[p], info[p]) for p in run.pairs}, ref_info))
    if gathered is None:
        return None
    entries, grids = [], {}
    for m, n in run.pairs:
        per_shard, gen_s, diverged = {}, 0.0, False
        for part, _ in gathered:
            part_errors, part_info = part[p_key((m, n))]
            per_shard.update(part_errors)
            gen_s += part_info["gen_s"]
            diverged |= part_info["diverged"]
            if part_info["grid"] is not None:
                grids[(m.label, n)] = part_info["grid"]
        mean = ci = None
        if not diverged:
            err = torch.cat([per_shard[s] for s in sorted(per_shard)])  # sample order: any process count agrees
            mean = float(err.mean())
            ci = Z95 * float(err.std()) / math.sqrt(err.numel())
        entries.append(_entry(m, n, mse=mean, mse_ci95=ci, diverged=diverged, gen_s=gen_s,
                              samples_per_s=cfg.num_samples / gen_s if gen_s and not diverged else None))
    ref_grid = next((r["grid"] for _, r in gathered if r["grid"] is not None), None)
    results = {"config": run.identity, "processes": run.group.world_size,
               "reference": {"description": description, "time_s": sum(r["time_s"] for _, r in gathered)},
               "floor": {}, "entries": entries, "wall_s": time.perf_counter() - started}
    notes = [f"MSE = mean over samples of ||x - x_ref||^2 / D against {description} from the same noise"
             f"{' (latents)' if isinstance(testbed, PipelineTestbed) else ''}; "
             "CI: 1.96 std / sqrt(n). Times are summed over processes and shards."]
    run.report(results, ("mse", "mse_ci95", "samples_per_s", "gen_s"), "mse", ref_grid, "reference", grids, notes)
    return results
