"""``fewstep compare``: every solver at a few NFEs against a cached high-NFE reference.

The run folder (``out``) has one writer at a time (a lock on the folder) and holds:

* ``config.yaml``: the resolved settings (``--config OUT/config.yaml`` reruns them);
* ``results.json``: rewritten atomically after every finished (solver, NFE) pair, so an
  interrupted run resumes where it stopped;
* ``reference.safetensors``: the reference samples (``reference.partial.safetensors``
  holds the finished chunks while it is computed, so a crash keeps them);
* ``results.md``, ``quality_vs_nfe.png``, ``samples.png`` and ``samples/`` (a few
  samples per pair for the grid).

References are also cached under ``cache_dir``, keyed by everything that determines
them; a cached file is used only when its recorded identity, shape and finiteness
check out, and an unwritable cache only costs a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional

import torch

from ..config import (add_cache_dir_argument, add_config_arguments, add_runtime_arguments, check_runtime_settings, parse_spec, resolve_config,
                      save_config, torch_threads)
from ..samplers import TimeShift, get_solver, list_solvers
from ..samplers.artifacts import Artifact
from ..samplers.timesteps import SPACINGS
from .diffusers_schedulers import DIFFUSERS_PREFIX, is_diffusers_spec, parse_diffusers_spec
from fewstep.infra.io import (
    atomic_write_bytes,
    clean_temp_files,
    load_tensors,
    lock_directory,
    read_json,
    save_tensors,
    write_json,
)
from fewstep.infra.validation import (
    check_choice,
    check_count,
    check_guidance,
    check_nfe_list,
    check_reference_nfe,
    check_seed,
)
from .reference import ReferenceStore, default_cache_dir, timed
from .report import markdown_report, pivot_tables, plot_quality, sample_grid, tuned_notes
from fewstep.eval.testbeds import Testbed, check_model, make_testbed, model_identity

__all__ = ["Method", "CompareConfig", "run_compare", "add_compare_parser", "DEFAULT_NFES", "DEFAULT_THREADS"]

DEFAULT_NFES = (5, 6, 8, 10)
# Third-order DPM-Solver++ with the full second-difference term (see solvers/dpmpp.py).
DEFAULT_REFERENCE = "dpmpp:order=3,third_order=taylor"
# Fastest for the digits run on a 2-core machine that other jobs share
# (benchmarks/compare_threads.py, results in benchmarks/results/compare_threads.md).
DEFAULT_THREADS = 1
GRID_SAMPLES = 10
_LOCK_HOLDER = "another fewstep compare"


# Options of fewstep.sample that a spec may carry besides the solver's own (e.g. ddim:time_shift=[20,300]).
SAMPLING_OPTIONS = ("time_shift",)


@dataclass(frozen=True)
class Method:
    """A solver with fixed options, written ``name`` or ``name:key=value,key=value``.

    Values are JSON where they parse as JSON (lists keep their commas: ``dc:ratios=[1,1,0.9]``);
    ``time_shift`` is passed to :func:`fewstep.sample` rather than to the solver. A diffusers
    scheduler is written ``diffusers:ClassName[:key=value,...]`` (its constructor options; see
    :mod:`fewstep.eval.diffusers_schedulers`).
    """

    solver: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Method":
        """Parse ``unipc`` / ``unipc:order=3,variant=bh1``; values are JSON when they parse as JSON.

        Raises:
            ValueError: malformed spec, repeated option, unknown solver or invalid options.
        """
        if is_diffusers_spec(spec):
            name, options = parse_diffusers_spec(spec)
            return cls(DIFFUSERS_PREFIX + name, tuple(sorted(options.items())))
        name, options = parse_spec(spec, "solver spec")
        # validates name and options now, not mid-run
        get_solver(name, **{k: v for k, v in options.items() if k not in SAMPLING_OPTIONS})
        TimeShift.coerce(options.get("time_shift"))
        return cls(name, tuple(sorted(options.items())))

    def __hash__(self) -> int:  # option values may be lists (dc:ratios=[...]), which do not hash
        return hash((self.solver, repr(self.options)))

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def canonical(self) -> tuple:
        """The solver with every option resolved: equal for specs that sample identically."""
        if self.is_diffusers:  # its defaults depend on the model's config: the options as given
            return self.solver, tuple((k, repr(v)) for k, v in self.options)
        options = self.option_dict
        sampling = tuple((k, repr(options.pop(k))) for k in SAMPLING_OPTIONS if k in options)
        config = get_solver(self.solver, **options).config
        # A tuned file counts by its content, not its path: rewriting it in place is another method.
        config = {k: _content_identity(v) for k, v in config.items()}
        return self.solver, tuple(sorted(config.items())) + sampling

    @property
    def identity(self) -> Any:
        """:attr:`canonical` as JSON reads it back (tuned files by content hash): what a kept result must match."""
        return json.loads(json.dumps(self.canonical))

    @property
    def carries_tuned_file(self) -> bool:
        """Whether an option is a tuned file (an artifact)."""
        if self.is_diffusers:
            return False
        options = {k: v for k, v in self.option_dict.items() if k not in SAMPLING_OPTIONS}
        return any(isinstance(v, Artifact) for v in get_solver(self.solver, **options).config.values())

    @property
    def is_diffusers(self) -> bool:
        return is_diffusers_spec(self.solver)

    @property
    def label(self) -> str:
        if not self.options:
            return self.solver
        return f"{self.solver}({','.join(f'{k}={v}' for k, v in self.options)})"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label).strip("_")

    @classmethod
    def parse_unique(cls, specs: Iterable[str]) -> list[tuple["Method", str]]:
        """``(method, spec)`` of each spec that samples differently from the ones before it.

        ``unipc unipc`` or ``unipc unipc:order=2`` (the default order) keep the first spec only.
        """
        unique, seen = [], set()
        for spec in specs:
            m = cls.parse(spec)
            if m.canonical not in seen:
                seen.add(m.canonical)
                unique.append((m, spec))
        return unique


def _content_identity(value: Any) -> Any:
    """A solver option as it enters a run identity: an artifact by its kind and content hash."""
    return (value.kind, value.sha256()) if isinstance(value, Artifact) else value


def check_sampling_settings(cfg: Any) -> None:
    """Check (and normalise) the settings ``fewstep compare`` and ``fewstep eval fid|mse`` share: nfe (a list,
    repeats run once), num_samples (>= 2: an FD needs two samples), seed, guidance, spacing, threads, device."""
    cfg.nfe = check_nfe_list(cfg.nfe)
    cfg.num_samples = check_count("num_samples", cfg.num_samples, 2, optional=True)
    cfg.seed = check_seed(cfg.seed)
    if cfg.guidance is not None:
        cfg.guidance = check_guidance(cfg.guidance, minimum=0)
    if cfg.spacing is not None:
        check_choice("spacing", cfg.spacing, SPACINGS)
    check_runtime_settings(cfg)


@dataclass
class CompareConfig:
    """Settings of ``fewstep compare``; also the schema of its YAML files (``configs/compare/``).

    ``None`` means the model's default (see ``fewstep compare --help``). The fields up to
    ``width`` (and the device type) determine the numbers; the rest say how to run.

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder.
        solvers: Solver specs (``unipc:order=3,variant=bh1``); None: every registered solver that
            runs with its default options and needs no tuned file (``dc`` needs its ratios,
            ``dpmv3`` its model's EMS file, ``usf`` a solver schedule: name them).
        nfe: Model evaluations per sample to compare (duplicates are dropped).
        num_samples: Samples per run (sample i uses noise seed ``seed + i``).
        seed: First noise seed.
        guidance: Classifier-free guidance scale (<= 1: no guidance).
        spacing: Timestep spacing for every solver; None: the model's own.
        reference: Solver spec of the reference (the GMM uses its exact ODE solution).
        reference_nfe: Steps of the reference solver.
        prompts: Pipeline prompts (sample i uses prompt ``i % len(prompts)``).
        height: Pipeline image height; None: the pipeline's default.
        width: Pipeline image width; None: the pipeline's default.
        out: Run folder.
        cache_dir: fewstep's cache folder (references in ``<cache_dir>/references``); None: ``$FEWSTEP_CACHE``
            or ``~/.cache/fewstep``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        threads: Torch CPU threads.
        repeats: Timed runs per (solver, NFE); the time column is their median.
        plot: Write ``quality_vs_nfe.png``.
        progress: Show progress bars.
    """

    model: str = "digits"
    solvers: Optional[List[str]] = None
    nfe: List[int] = field(default_factory=lambda: list(DEFAULT_NFES))
    num_samples: Optional[int] = None
    seed: int = 0
    guidance: Optional[float] = None
    spacing: Optional[str] = None
    reference: str = DEFAULT_REFERENCE
    reference_nfe: Optional[int] = None
    prompts: Optional[List[str]] = None
    height: Optional[int] = None
    width: Optional[int] = None
    out: str = "runs/compare"
    cache_dir: Optional[str] = None
    device: str = "cpu"
    threads: int = DEFAULT_THREADS
    repeats: int = 1
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not str(self.model):
            raise ValueError("model must be digits, gmm, gmm-flow or a pipeline folder")
        check_sampling_settings(self)
        if self.reference_nfe is not None:
            self.reference_nfe = check_reference_nfe(self.reference_nfe, self.nfe)
        self.repeats = check_count("repeats", self.repeats)
        for key in ("height", "width"):
            if getattr(self, key) is not None and getattr(self, key) < 8:
                raise ValueError(f"{key} must be >= 8 pixels, got {getattr(self, key)}")
        if self.prompts is not None and not self.prompts:
            raise ValueError("prompts must hold at least one prompt (or be null for the defaults)")
        specs = list_solvers(runnable=True) if self.solvers is None else list(self.solvers)
        if not specs:
            raise ValueError("no solvers to compare")
        unique = Method.parse_unique(specs)
        self._methods = [m for m, _ in unique]
        self._reference = Method.parse(self.reference)
        if self.solvers is not None:
            self.solvers = [spec for _, spec in unique]

    @property
    def methods(self) -> list[Method]:
        """The parsed, de-duplicated solvers."""
        return list(self._methods)

    @property
    def reference_method(self) -> Method:
        return self._reference

    def with_defaults(self, testbed: Testbed) -> "CompareConfig":
        """A copy with every model default (``None``) filled in from ``testbed``."""
        filled = dict(
            num_samples=testbed.default_num_samples, guidance=testbed.default_guidance,
            reference_nfe=max(testbed.default_reference_nfe, max(self.nfe)), spacing=testbed.default_spacing,
        )
        for key in ("prompts", "height", "width"):
            if hasattr(testbed, key):
                filled[key] = getattr(testbed, key)
        return replace(self, **{k: v for k, v in filled.items() if getattr(self, k) is None})

    def identity(self, testbed: Testbed) -> dict[str, Any]:
        """What results.json and the reference cache are keyed by (not the solver list)."""
        from fewstep._version import __version__

        model = model_identity(self.model)
        return {
            "fewstep": __version__, "model": model, "testbed": testbed.fingerprint(), "num_samples": self.num_samples,
            "seed": self.seed, "guidance": self.guidance, "spacing": self.spacing,
            "reference": self._reference.label, "reference_nfe": self.reference_nfe,
            "device": testbed.device.type, "batch_size": testbed.batch_size,
        }


def _load_results(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        old = read_json(path)
    except ValueError as exc:
        raise ValueError(f"{exc}; delete it or choose another output folder") from None
    entries = old.get("entries") if isinstance(old, dict) else None
    if (not isinstance(old, dict) or not isinstance(old.get("config"), dict) or not isinstance(entries, list)
            or not all(isinstance(e, dict) and isinstance(e.get("method"), str) and isinstance(e.get("nfe"), int)
                       for e in entries)
            or not isinstance(old.get("reference"), dict)):
        raise ValueError(f"{path} is not a fewstep compare results file; delete it or choose another output folder")
    if old["config"] != identity:
        differs = sorted(k for k in identity if old["config"].get(k) != identity[k])
        raise ValueError(f"{path} holds results of a different configuration (differs in: {differs}); "
                         f"choose another output folder or delete it")
    return old


def _drop_stale_entries(results: dict[str, Any], methods: list[Method], log: Callable[[str], None]) -> None:
    """Forget kept results of a spec whose solver now resolves differently (a tuned file rewritten in place)."""
    current = {m.label: m for m in methods}

    def is_stale(e: dict[str, Any]) -> bool:
        m = current.get(e["method"])
        if m is None:
            return False
        if "canonical" not in e:  # written before content hashes: only a tuned file can have changed
            return m.carries_tuned_file
        return e["canonical"] != m.identity

    stale = [e for e in results["entries"] if is_stale(e)]
    for label in dict.fromkeys(e["method"] for e in stale):
        log(f"recomputing {label}: its tuned file changed (or the kept result predates content hashes)")
    results["entries"] = [e for e in results["entries"] if not any(e is x for x in stale)]


def _run_method(testbed: Testbed, cfg: CompareConfig, method: Method, nfe: int, x_T: torch.Tensor,
                cond: torch.Tensor) -> tuple[torch.Tensor | None, list[float]]:
    """Samples (None if the solver diverged) and the wall time of each repeat."""
    bs = testbed.batch_size

    def once() -> torch.Tensor:
        return torch.cat([
            testbed.generate(method.solver, method.option_dict, nfe, x_T[i:i + bs], cond[i:i + bs], cfg.guidance,
                             cfg.spacing)
            for i in range(0, x_T.shape[0], bs)
        ])

    samples, times = None, []
    for _ in range(cfg.repeats):
        try:
            samples, seconds = timed(once, testbed.device)
        except FloatingPointError:  # the model saw a diverged sample: a result, not a crash
            return None, []
        times.append(seconds)
    return (samples if bool(torch.isfinite(samples).all()) else None), times


def run_compare(testbed: Testbed, cfg: CompareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a comparison, write its report and log a summary.

    Args:
        testbed: The model (see :func:`fewstep.eval.testbeds.make_testbed`).
        cfg: The settings; model defaults still ``None`` are filled from ``testbed``.
        log: Where progress messages and the summary go.

    Returns:
        The results dictionary also written to ``cfg.out/results.json``.

    Raises:
        ValueError: the run folder is in use, holds another configuration or a corrupt
            results file, or the reference is not finite.
        OSError: a file cannot be written.
    """
    cfg = cfg.with_defaults(testbed)
    ref = cfg.reference_method
    testbed.check_solver(ref.solver, ref.option_dict, [cfg.reference_nfe], cfg.spacing)  # diffusers: before any run
    for m in cfg.methods:
        testbed.check_solver(m.solver, m.option_dict, cfg.nfe, cfg.spacing)
    out = Path(cfg.out)
    cache = default_cache_dir(cfg.cache_dir)
    identity = cfg.identity(testbed)
    results_path = out / "results.json"
    with lock_directory(out, _LOCK_HOLDER):
        if (out / "samples").exists() and not (out / "samples").is_dir():
            raise ValueError(f"{out / 'samples'} is not a folder; compare keeps per-run samples there")
        for folder in (out, out / "samples"):  # we hold the lock: every temporary file there is stale
            clean_temp_files(folder, all_stale=True)
        clean_temp_files(cache)
        results = _load_results(results_path, identity)
        written = [save_config(cfg, out)]
        x_T, cond = testbed.initial_noise(cfg.num_samples, cfg.seed)
        reference = ReferenceStore(identity, Path(cfg.model).name, out, cache, log)
        description = testbed.reference_description(cfg.reference_method.label, cfg.reference_nfe)
        ref, ref_seconds = reference.get(
            x_T, lambda sl: testbed.reference(x_T[sl], cond[sl], cfg.guidance, cfg.spacing, cfg.reference_method.solver,
                                              cfg.reference_method.option_dict, cfg.reference_nfe),
            testbed.batch_size, description, testbed.device, cfg.progress)
        if reference.wrote_run_copy:
            written.append(reference.run_copy)
        if results is None:
            results = {
                "config": identity,
                "fd_name": testbed.fd_name,
                "reference": {"description": description, "time_s": ref_seconds, **testbed.evaluate(ref, cond),
                },
                "floor": testbed.floor(),
                "entries": [],
            }
            write_json(results_path, results)

        pairs = [(m, n) for m in cfg.methods for n in cfg.nfe]
        _drop_stale_entries(results, cfg.methods, log)
        done = {(e["method"], e["nfe"]) for e in results["entries"]}
        todo = [(m, n) for m, n in pairs if (m.label, n) not in done]
        if len(todo) < len(pairs):
            log(f"resuming: {len(pairs) - len(todo)} of {len(pairs)} results already in {results_path}")
        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc="compare", unit="run", disable=not cfg.progress or not todo) as bar:
            for method, nfe in todo:
                bar.set_postfix_str(f"{method.label} NFE {nfe}")
                samples, times = _run_method(testbed, cfg, method, nfe, x_T, cond)
                if samples is not None:
                    mse = (samples - ref).pow(2).flatten(1).mean(1).mean().item()
                    metrics = testbed.evaluate(samples, cond)
                    if testbed.images(samples[:1]) is not None:  # kept for the sample grid
                        save_tensors(out / "samples" / f"{method.slug}-nfe{nfe}.safetensors",
                                     {"x": samples[:GRID_SAMPLES]})
                else:
                    mse, metrics = None, {m: None for m in testbed.metrics}
                results["entries"].append({
                    "method": method.label, "solver": method.solver, "options": method.option_dict, "nfe": nfe,
                    "canonical": method.identity,
                    "mse": mse, **metrics, "diverged": samples is None,
                    "time_s": statistics.median(times) if times else None, "time_runs": len(times),
                })
                write_json(results_path, results)
                bar.update()

        results["tuned_notes"] = tuned_notes(cfg.methods)
        # Report in the order asked for, with any extra resumed entries after.
        order = {(m.label, n): i for i, (m, n) in enumerate(pairs)}
        results["entries"].sort(key=lambda e: order.get((e["method"], e["nfe"]), len(order)))
        write_json(results_path, results)
        written.append(results_path)
        metrics = ("mse", *testbed.metrics, "time_s")
        atomic_write_bytes(out / "results.md", markdown_report(results, metrics).encode())
        written.append(out / "results.md")
        if cfg.plot:
            if plot_quality(results, out / "quality_vs_nfe.png", ("mse", *testbed.metrics)):
                written.append(out / "quality_vs_nfe.png")
            else:
                log("matplotlib is not installed: skipped quality_vs_nfe.png (pip install 'fewstep[plot]')")
        if _write_grid(testbed, cfg, results, ref, out):
            written.append(out / "samples.png")

    log("")
    log(pivot_tables(results, metrics))
    for line in results["tuned_notes"]:
        log(line)
    for k, v in results["floor"].items():
        name = results["fd_name"] if k == "fd" else k
        log(f"\n{name} of real data against itself (two halves): {v:.3f}; of the reference samples: "
            f"{results['reference'].get(k, float('nan')):.3f}")
    log(f"\nwrote {out}{os.sep}: {', '.join(p.name for p in written)}")
    return results


def _write_grid(testbed: Testbed, cfg: CompareConfig, results: dict[str, Any], ref: torch.Tensor, out: Path) -> bool:
    ref_images = testbed.images(ref[:GRID_SAMPLES])
    if ref_images is None:
        return False
    diverged = {(e["method"], e["nfe"]) for e in results["entries"] if e.get("diverged")}
    rows = []
    for m in cfg.methods:
        blocks = {}
        for n in cfg.nfe:
            f = out / "samples" / f"{m.slug}-nfe{n}.safetensors"
            if (m.label, n) in diverged:
                blocks[n] = "diverged"
            elif f.is_file():
                blocks[n] = testbed.images(load_tensors(f)["x"])
        rows.append((m.label, blocks))
    sample_grid(ref_images, rows, out / "samples.png")
    return True


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep compare``."""
    p = sub.add_parser(
        "compare",
        help="benchmark solvers at low NFE against a high-NFE reference",
        description=(
            "Run every solver at a few NFEs on the built-in digits model (or the analytic GMM, or a local\n"
            "diffusers pipeline) and report MSE to a reference (same noise), FD, classifier accuracy and\n"
            "wall time. Results are saved after every (solver, NFE) pair; rerunning the same command\n"
            "resumes, and adding solvers or NFEs only computes the new ones."
        ),
        epilog=(
            "Defaults that depend on the model:\n"
            "  num samples     1000 for digits and gmm, 16 for pipelines\n"
            "  reference NFE   200 for digits, 100 for pipelines (gmm: exact ODE solution)\n"
            "  guidance        1.5 digits, 2.0 gmm, 7.5 pipelines\n"
            "  height, width   the pipeline's own resolution\n\n"
            "Settings can also come from a YAML file and key=value items (later wins):\n"
            "  defaults < --config FILE.yaml < flags < key=value\n"
            "  fewstep compare --config configs/compare/smoke.yaml nfe=[4,8] out=runs/smoke-4-8\n"
            "The resolved settings are saved as OUT/config.yaml."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--solvers", nargs="+", metavar="SPEC",
                   help="solvers, e.g. ddim unipc:order=3,variant=bh1 dpmv3:ems=FILE (default: every registered solver "
                        "that needs no tuned file; "
                        "see 'fewstep solvers')")
    p.add_argument("--nfe", nargs="+", type=int, metavar="N", help="model evaluations per sample (default: 5 6 8 10)")
    p.add_argument("--guidance", type=float, metavar="W", help="classifier-free guidance scale (default: per model, see below)")
    p.add_argument("--num-samples", dest="num_samples", type=int, metavar="N", help="samples per run (default: per model)")
    p.add_argument("--seed", type=int, metavar="N", help="sample i uses noise seed SEED + i (default: 0)")
    p.add_argument("--spacing", choices=SPACINGS, metavar="NAME",
                   help=f"timestep spacing for every solver: {', '.join(SPACINGS)} (default: the model's own; "
                        "linspace for digits/gmm)")
    p.add_argument("--reference", metavar="SPEC", help=f"reference solver (default: {DEFAULT_REFERENCE})")
    p.add_argument("--reference-nfe", dest="reference_nfe", type=int, metavar="N", help="reference steps (default: per model)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="pipeline prompt, repeatable (default: four built-in prompts)")
    p.add_argument("--height", type=int, metavar="PX", help="pipeline image height (default: the pipeline's)")
    p.add_argument("--width", type=int, metavar="PX", help="pipeline image width (default: the pipeline's)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/compare)")
    add_cache_dir_argument(p, "reference samples in DIR/references")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="timed runs per solver and NFE; the time column is their median (default: 1)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip quality_vs_nfe.png")
    add_runtime_arguments(p, default_threads=DEFAULT_THREADS)
    add_config_arguments(p, CompareConfig)
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep compare``."""
    cfg = resolve_config(CompareConfig, args)
    args.resume_hint = f"finished results are kept in {cfg.out}; run the same command again to resume"
    check_model(cfg.model)  # a typo in --model leaves no empty run folder behind
    # The lock refuses a second run before any model is loaded.
    with torch_threads(cfg.threads), lock_directory(cfg.out, _LOCK_HOLDER):
        testbed = make_testbed(cfg.model, cfg.device, cfg.prompts, cfg.height, cfg.width)
        run_compare(testbed, cfg)
    return 0
