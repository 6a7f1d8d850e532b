"""The cheap fitness every search uses: a metric of a solver's samples on a fixed batch of search noise.

The batch uses noise seeds ``data_seed + i`` (default 100000 and up, disjoint from the
evaluation seeds 0..N-1 of ``fewstep compare``) and is compared, with the same noise,
against the reference ``fewstep compare`` uses (third-order DPM-Solver++ with 200 steps,
or the exact ODE for the GMM). The reference is computed once, kept in the run folder
(``reference.safetensors``, with the settings it was made for) and in the reference cache
(``$FEWSTEP_CACHE/references``), so searches on the same model and batch share it
(:class:`~fewstep.eval.reference.ReferenceStore`, as ``fewstep compare``'s references).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fewstep.eval.compare import DEFAULT_REFERENCE, Method
from fewstep.eval.reference import ReferenceStore, default_cache_dir
from fewstep.eval.testbeds import PipelineTestbed, Testbed
from fewstep.infra.validation import check_nfe
from fewstep.samplers import ArtifactMeta, NoiseSchedule, model_fingerprint

__all__ = ["Fitness", "METRICS", "SEARCH_SEED", "noise_schedule_of", "testbed_fingerprint"]

METRICS = ("mse", "fd")
SEARCH_SEED = 100_000  # search data seeds start here; evaluation seeds are 0..N-1


def noise_schedule_of(testbed: Testbed) -> NoiseSchedule:
    """The noise schedule a testbed's model was trained with."""
    schedule = getattr(testbed, "schedule", None)
    if schedule is None:  # a pipeline: its scheduler config says
        from fewstep.samplers.scheduler import FewstepScheduler

        schedule = FewstepScheduler.from_config(testbed.base_config).schedule
    return schedule


def check_reference(testbed: Testbed, reference: str, reference_nfe: int | None) -> Method:
    """The parsed reference spec, checked against the model (settings the model would ignore are refused).

    Raises:
        TypeError, ValueError: ``reference_nfe`` is no NFE, or a reference/reference_nfe given for a model whose
            reference is exact (the GMM's ODE solution).
    """
    method = Method.parse(reference)
    if reference_nfe is not None:
        check_nfe(reference_nfe, "reference_nfe")
    if testbed.exact_reference and (reference != DEFAULT_REFERENCE or reference_nfe is not None):
        raise ValueError(f"the {testbed.name} model's reference is exact "
                         f"({testbed.reference_description('', 0)}): reference and reference_nfe do not apply")
    return method


def testbed_fingerprint(testbed: Testbed) -> str | None:
    """:func:`~fewstep.model_fingerprint` of the network (or analytic model) behind a testbed."""
    for name in ("unet", "pipe", "model"):
        model = getattr(testbed, name, None)
        if model is not None and not callable(getattr(model, "__func__", None)):
            return model_fingerprint(model)
    return None


class Fitness:
    """Scores (solver, options) by the metric of its samples on the search batch; lower is better.

    Args:
        testbed: The model.
        nfe: Model evaluations per sample.
        guidance: CFG scale (None or <= 1: none).
        num_samples: Size of the search batch.
        data_seed: Noise seed of the first sample.
        metric: ``mse`` (to the reference, same noise) or ``fd`` (the testbed's FD).
        run_dir: Where the reference is kept.
        reference: Solver spec of the reference (ignored by the GMM, whose reference is exact).
        reference_nfe: Its steps (None: the testbed's default).
        cache_dir: fewstep's cache folder, the reference in ``<cache_dir>/references`` (None: ``$FEWSTEP_CACHE``
            or ``~/.cache/fewstep``).
        log: Progress messages.
    """

    def __init__(self, testbed: Testbed, nfe: int, guidance: float | None, num_samples: int, data_seed: int,
                 metric: str, run_dir: str | Path, reference: str = DEFAULT_REFERENCE,
                 reference_nfe: int | None = None, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] = print):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not one of {METRICS}")
        if metric == "fd" and "fd" not in testbed.metrics:
            raise ValueError(f"metric 'fd' needs a model with an FD (digits, gmm), not {testbed.name}")
        self.testbed, self.nfe, self.metric = testbed, nfe, metric
        self.guidance = guidance
        self.schedule = noise_schedule_of(testbed)
        self.fingerprint = testbed_fingerprint(testbed)
        self.x_T, self.cond = testbed.initial_noise(num_samples, data_seed)
        self.reference_method = check_reference(testbed, reference, reference_nfe)
        self.reference_nfe = reference_nfe or testbed.default_reference_nfe
        # What the reference is, as recorded in the run's identity and the result's provenance.
        described = (dict(reference=testbed.reference_description("", 0), reference_nfe=None)
                     if testbed.exact_reference else
                     dict(reference=self.reference_method.label, reference_nfe=self.reference_nfe))
        self.identity = {"testbed": testbed.fingerprint(), "guidance": guidance, "num_samples": num_samples,
                         "data_seed": data_seed, **described}
        cache = default_cache_dir(cache_dir)
        self.reference = self._reference(Path(run_dir), cache, log)
        self.seconds = 0.0  # spent in evaluations

    @property
    def analytic_first_step_allowed(self) -> bool:
        """Pipelines evaluate the model at every timestep, so an analytic first step saves nothing there."""
        return not isinstance(self.testbed, PipelineTestbed)

    def meta(self, solver: str | None, **extra: Any) -> ArtifactMeta:
        """Provenance for a schedule found with this fitness."""
        return ArtifactMeta(fingerprint=self.fingerprint, schedule=self.schedule.to_dict(), nfe=self.nfe,
                            guidance=self.guidance, solver=solver,
                            extra={"fitness": {**self.identity, "metric": self.metric}, **extra})

    def _reference(self, run_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> torch.Tensor:
        testbed, method, n = self.testbed, self.reference_method, self.x_T.shape[0]
        store = ReferenceStore(self.identity, "search", run_dir, cache_dir, log)
        description = f"{testbed.reference_description(method.label, self.reference_nfe)} on {n} search samples"

        def compute(chunk: slice) -> torch.Tensor:
            return testbed.reference(self.x_T[chunk], self.cond[chunk], self.guidance, None, method.solver,
                                     method.option_dict, self.reference_nfe)

        return store.get(self.x_T, compute, testbed.batch_size, description, testbed.device, progress=False)[0]

    def samples(self, solver: str, options: dict[str, Any]) -> torch.Tensor | None:
        """The search batch sampled with ``solver``; None if it diverged."""
        bs = self.testbed.batch_size
        try:
            out = torch.cat([
                self.testbed.generate(solver, options, self.nfe, self.x_T[i:i + bs], self.cond[i:i + bs],
                                      self.guidance, None)
                for i in range(0, self.x_T.shape[0], bs)])
        except FloatingPointError:
            return None
        return out if bool(torch.isfinite(out).all()) else None

    def errors(self, solver: str, options: dict[str, Any]) -> torch.Tensor:
        """Per-sample squared error to the reference (mean over dimensions); inf where sampling diverged."""
        x = self.samples(solver, options)
        if x is None:
            return torch.full((self.x_T.shape[0],), float("inf"), dtype=torch.float64)
        return (x - self.reference).pow(2).flatten(1).mean(1).double()

    def __call__(self, solver: str, options: dict[str, Any]) -> float:
        """The metric (``inf`` when sampling diverged)."""
        start = time.perf_counter()
        try:
            x = self.samples(solver, options)
            if x is None:
                return math.inf
            if self.metric == "mse":
                value = (x - self.reference).pow(2).flatten(1).mean(1).mean().item()
            else:
                value = float(self.testbed.evaluate(x, self.cond)["fd"])
            return value if math.isfinite(value) else math.inf
        finally:
            self.seconds += time.perf_counter() - start
