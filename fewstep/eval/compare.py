"""``fewstep compare``: every solver at a few NFEs against a cached high-NFE reference.

The run directory holds ``results.json`` (rewritten atomically after every finished
(solver, NFE) pair, so a crashed run resumes where it stopped), ``results.md``,
``quality_vs_nfe.png``, ``samples.png`` and ``samples/`` (a few samples per pair for
the grid). References are cached under ``--cache-dir`` keyed by everything that
determines them, so reruns and other output folders reuse them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..samplers import get_solver, list_solvers
from ..samplers.timesteps import SPACINGS
from .io import load_tensors, read_json, save_tensors, write_json
from .report import markdown_report, pivot_tables, plot_quality, sample_grid
from .testbeds import Testbed, make_testbed

__all__ = ["Method", "CompareConfig", "run_compare", "add_compare_parser", "DEFAULT_NFES"]

DEFAULT_NFES = (5, 6, 8, 10)
# Third-order DPM-Solver++ with the full second-difference term (see solvers/dpmpp.py).
DEFAULT_REFERENCE = "dpmpp:order=3,third_order=taylor"
GRID_SAMPLES = 10
_DEFAULT_GUIDANCE = {"digits": 1.5, "gmm": 2.0, "gmm-flow": 2.0}  # digits: the model's own default
_DEFAULT_PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse",
                    "a red cube on a wooden table", "portrait of an old man, studio lighting")


@dataclass(frozen=True)
class Method:
    """A solver with fixed options, written ``name`` or ``name:key=value,key=value``."""

    solver: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "Method":
        """Parse ``unipc`` / ``unipc:order=3,variant=bh1``; values are JSON when they parse as JSON.

        Raises:
            ValueError: malformed spec, unknown solver or invalid options.
        """
        name, _, rest = spec.partition(":")
        options = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"solver spec {spec!r}: expected key=value, got {item!r}")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
        get_solver(name.strip(), **options)  # validates name and options now, not mid-run
        return cls(name.strip(), tuple(sorted(options.items())))

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        if not self.options:
            return self.solver
        return f"{self.solver}({','.join(f'{k}={v}' for k, v in self.options)})"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.label).strip("_")


@dataclass
class CompareConfig:
    """Everything that determines a comparison's numbers."""

    model: str = "digits"
    methods: list[Method] = field(default_factory=lambda: [Method(n) for n in list_solvers()])
    nfes: tuple[int, ...] = DEFAULT_NFES
    num_samples: int = 1000
    seed: int = 0
    guidance: float = 1.5
    spacing: str | None = None
    reference: Method = field(default_factory=lambda: Method.parse(DEFAULT_REFERENCE))
    reference_nfe: int = 200

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2, got {self.num_samples}")
        if not self.nfes or any(not isinstance(n, int) or n < 1 for n in self.nfes):
            raise ValueError(f"--nfe values must be whole numbers >= 1, got {list(self.nfes)}")
        if self.reference_nfe < max(self.nfes):
            raise ValueError(f"--reference-nfe ({self.reference_nfe}) must be at least the largest --nfe")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"--spacing {self.spacing!r} is not one of {SPACINGS}")
        if not self.methods:
            raise ValueError("no solvers to compare")

    def identity(self, testbed: Testbed) -> dict[str, Any]:
        """What results.json and the reference cache are keyed by (not the solver list)."""
        from .. import __version__

        return {
            "fewstep": __version__, "model": self.model, "testbed": testbed.fingerprint(), "num_samples": self.num_samples,
            "seed": self.seed, "guidance": self.guidance, "spacing": self.spacing,
            "reference": self.reference.label, "reference_nfe": self.reference_nfe,
        }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep")) / "references"


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _reference(testbed: Testbed, cfg: CompareConfig, x_T, cond, cache_dir: Path, log) -> tuple[torch.Tensor, float]:
    ident = cfg.identity(testbed)
    name = "".join(c if c.isalnum() else "_" for c in Path(cfg.model).name) or "model"
    path = cache_dir / f"{name}-{_digest(ident)}.safetensors"
    if path.is_file():
        try:
            cached = load_tensors(path)
            if cached["samples"].shape[0] == cfg.num_samples:
                log(f"reference: cached {path}")
                return cached["samples"], float(cached["time_s"])
        except ValueError as exc:
            log(f"reference cache unreadable, recomputing: {exc}")
    log(f"reference: {testbed.reference_description(cfg.reference.label, cfg.reference_nfe)} ...")
    ref, seconds = _timed(lambda: testbed.reference(x_T, cond, cfg.guidance, cfg.spacing, cfg.reference.solver,
                                                    cfg.reference.option_dict, cfg.reference_nfe))
    save_tensors(path, {"samples": ref, "time_s": torch.tensor(seconds)}, {"identity": json.dumps(ident)})
    return ref, seconds


def _load_results(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    old = read_json(path)
    if old.get("config") != identity:
        raise ValueError(
            f"{path} holds results of a different configuration; pass another --out or delete it "
            f"(differs in: {sorted(k for k in identity if old.get('config', {}).get(k) != identity[k])})"
        )
    return old


def run_compare(
    testbed: Testbed,
    cfg: CompareConfig,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    plot: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume) a comparison and write its report.

    Returns:
        The results dictionary also written to ``out_dir/results.json``.
    """
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else _default_cache_dir()
    identity = cfg.identity(testbed)
    results_path = out_dir / "results.json"
    results = _load_results(results_path, identity)

    x_T, cond = testbed.initial_noise(cfg.num_samples, cfg.seed)
    ref, ref_seconds = _reference(testbed, cfg, x_T, cond, cache_dir, log)
    if results is None:
        results = {
            "config": identity,
            "fd_name": "digits-FD" if cfg.model == "digits" else "FD",
            "reference": {
                "description": testbed.reference_description(cfg.reference.label, cfg.reference_nfe),
                "time_s": ref_seconds, **testbed.evaluate(ref, cond),
            },
            "floor": testbed.floor(),
            "entries": [],
        }
        write_json(results_path, results)
    save_tensors(out_dir / "samples" / "reference.safetensors", {"x": ref[:GRID_SAMPLES]})

    done = {(e["method"], e["nfe"]) for e in results["entries"]}
    todo = [(m, n) for m in cfg.methods for n in cfg.nfes if (m.label, n) not in done]
    if len(todo) < len(cfg.methods) * len(cfg.nfes):
        log(f"resuming: {len(cfg.methods) * len(cfg.nfes) - len(todo)} results already in {results_path}")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="compare", unit="run")
    for method, nfe in todo:
        if bar is not None:
            bar.set_postfix_str(f"{method.label} NFE {nfe}")
        samples, seconds = _timed(
            lambda: testbed.generate(method.solver, method.option_dict, nfe, x_T, cond, cfg.guidance, cfg.spacing)
        )
        if bool(torch.isfinite(samples).all()):
            mse = (samples - ref).pow(2).flatten(1).mean(1).mean().item()
            metrics = testbed.evaluate(samples, cond)
        else:  # a diverged solver is a result, not a crash
            mse, metrics = None, {m: None for m in testbed.metrics}
        entry = {"method": method.label, "solver": method.solver, "options": method.option_dict, "nfe": nfe,
                 "mse": mse, **metrics, "time_s": seconds}
        save_tensors(out_dir / "samples" / f"{method.slug}-nfe{nfe}.safetensors", {"x": samples[:GRID_SAMPLES]})
        results["entries"].append(entry)
        write_json(results_path, results)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    # Report in the order asked for, with any extra resumed entries after.
    order = {(m.label, n): i for i, (m, n) in enumerate((m, n) for m in cfg.methods for n in cfg.nfes)}
    results["entries"].sort(key=lambda e: order.get((e["method"], e["nfe"]), len(order)))
    write_json(results_path, results)
    metrics = ("mse", *testbed.metrics, "time_s")
    (out_dir / "results.md").write_text(markdown_report(results, metrics))
    if plot and not plot_quality(results, out_dir / "quality_vs_nfe.png", ("mse", *testbed.metrics)):
        log("matplotlib is not installed: skipped quality_vs_nfe.png (pip install 'fewstep[plot]')")
    _write_grid(testbed, cfg, out_dir)
    return results


def _write_grid(testbed: Testbed, cfg: CompareConfig, out_dir: Path) -> None:
    ref = load_tensors(out_dir / "samples" / "reference.safetensors")["x"]
    if testbed.images(ref) is None:
        return
    rows = [("reference", {0: testbed.images(ref)})]
    for m in cfg.methods:
        blocks = {}
        for n in cfg.nfes:
            f = out_dir / "samples" / f"{m.slug}-nfe{n}.safetensors"
            if f.is_file():
                blocks[n] = testbed.images(load_tensors(f)["x"])
        rows.append((m.label, blocks))
    sample_grid(rows, out_dir / "samples.png")


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fewstep compare``."""
    p = sub.add_parser(
        "compare",
        help="benchmark solvers at low NFE against a high-NFE reference",
        description="Run every solver at a few NFEs on the built-in digits model (or gmm, or a local diffusers "
                    "pipeline) and report MSE to a cached reference, FD, classifier accuracy and wall time.",
    )
    p.add_argument("--model", default="digits", help="digits (default), gmm, gmm-flow, or a pipeline folder")
    p.add_argument("--solvers", nargs="+", default=None, metavar="SPEC",
                   help="solvers to compare, e.g. 'unipc' 'unipc:order=3,variant=bh1' (default: all registered)")
    p.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFES), help="NFEs (default: 5 6 8 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 1.5 digits, 2.0 gmm, 7.5 pipelines)")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per run (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses noise seed SEED + i")
    p.add_argument("--spacing", default=None, choices=SPACINGS,
                   help="timestep spacing for every solver (default: the model's own, linspace for digits/gmm)")
    p.add_argument("--reference", default=DEFAULT_REFERENCE, help=f"reference solver spec (default: {DEFAULT_REFERENCE})")
    p.add_argument("--reference-nfe", type=int, default=200, help="reference NFE (default: 200)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--cache-dir", default=None, help="reference cache (default: $FEWSTEP_CACHE or ~/.cache/fewstep)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", action="append", default=None, help="pipeline prompt (repeatable)")
    p.add_argument("--height", type=int, default=64, help="pipeline image height")
    p.add_argument("--width", type=int, default=64, help="pipeline image width")
    p.add_argument("--no-plot", action="store_true", help="skip quality_vs_nfe.png")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """CLI body of ``fewstep compare``."""
    methods = [Method.parse(s) for s in args.solvers] if args.solvers else [Method(n) for n in list_solvers()]
    guidance = args.guidance if args.guidance is not None else _DEFAULT_GUIDANCE.get(args.model, 7.5)
    cfg = CompareConfig(
        model=args.model if args.model in _DEFAULT_GUIDANCE else str(Path(args.model).resolve()),
        methods=methods, nfes=tuple(args.nfe), num_samples=args.num_samples, seed=args.seed, guidance=guidance,
        spacing=args.spacing, reference=Method.parse(args.reference), reference_nfe=args.reference_nfe,
    )
    testbed = make_testbed(args.model, args.device, args.prompt or _DEFAULT_PROMPTS, args.height, args.width)
    results = run_compare(testbed, cfg, args.out, args.cache_dir, progress=not args.no_progress,
                          plot=not args.no_plot)
    print()
    print(pivot_tables(results, ("mse", *testbed.metrics, "time_s")))
    for k, v in results["floor"].items():
        print(f"\nreal data vs real data {k}: {v:.3f}; reference {k}: {results['reference'].get(k, float('nan')):.3f}")
    print(f"\nwrote {Path(args.out) / 'results.json'}, results.md, quality_vs_nfe.png, samples.png")
    return 0
