"""Settings every search shares (the base of the ``fewstep search`` config schemas)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from fewstep.config import check_runtime_settings
from fewstep.eval.compare import DEFAULT_REFERENCE
from fewstep.infra.validation import check_count, check_guidance, check_nfe
from fewstep.tuning.search.fitness import METRICS, SEARCH_SEED, check_reference

__all__ = ["SearchSettings"]


@dataclass
class SearchSettings:
    """What, against what, and how a search runs.

    Attributes:
        model: ``digits``, ``gmm``, ``gmm-flow`` or a local diffusers pipeline folder.
        nfe: Model evaluations of the schedule.
        guidance: CFG scale (None: the model's default).
        budget: Full evaluations (schedules sampled on the whole search batch).
        out: The solver schedule file written at the end (.json or .yaml).
        run_dir: Log, state and reference of the search (None: ``out`` without suffix + ``.run``).
        num_samples: Search batch size (None: the search's default).
        data_seed: Noise seed of the first search sample; at least 100000, so the search batch
            never overlaps the evaluation seeds 0..N-1 of ``fewstep compare``.
        metric: ``mse`` (to the reference, same noise) or ``fd`` (the model's FD).
        reference: Solver spec of the reference (the GMM's is its exact ODE solution).
        reference_nfe: Its steps (None: the model's default).
        cache_dir: fewstep's cache folder (references in ``<cache_dir>/references``; None: ``$FEWSTEP_CACHE``).
        validation_samples: Samples right after the search batch (seeds ``data_seed + num_samples``
            on) on which the result is checked against its baseline (:mod:`fewstep.tuning.search.guard`).
        keep_worse: Write the searched schedule even when it does not beat the baseline there
            (otherwise the baseline is written, and the search says so).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        threads: Torch CPU threads.
        progress: Show a progress bar.
    """

    model: str = "digits"
    nfe: int = 5
    guidance: Optional[float] = None
    budget: int = 200
    out: str = "runs/search.json"
    run_dir: Optional[str] = None
    num_samples: Optional[int] = None
    data_seed: int = SEARCH_SEED
    metric: str = "mse"
    reference: str = DEFAULT_REFERENCE
    reference_nfe: Optional[int] = None
    cache_dir: Optional[str] = None
    validation_samples: int = 128
    keep_worse: bool = False
    device: str = "cpu"
    threads: int = 1
    progress: bool = True

    default_samples: ClassVar[int] = 256
    # Settings that say how to run, not what is found (a larger budget continues a search).
    _HOW = ("budget", "out", "run_dir", "cache_dir", "validation_samples", "keep_worse", "device", "threads",
            "progress")

    def __post_init__(self) -> None:
        self.nfe = check_nfe(self.nfe)
        if self.budget < 1:
            raise ValueError(f"budget (full evaluations) must be >= 1, got {self.budget}")
        self.num_samples = check_count("num_samples", self.num_samples, 2, optional=True)
        if self.data_seed < SEARCH_SEED:
            raise ValueError(f"data_seed must be >= {SEARCH_SEED} (seeds below are evaluation seeds), "
                             f"got {self.data_seed}")
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.guidance is not None:
            self.guidance = check_guidance(self.guidance, minimum=0)
        if Path(self.out).suffix not in (".json", ".yaml", ".yml"):
            raise ValueError(f"out={self.out!r} must name a .json or .yaml solver schedule file")
        if self.validation_samples < 2:
            raise ValueError(f"validation_samples must be >= 2 (the held-out check of the result), "
                             f"got {self.validation_samples}")
        if self.reference_nfe is not None:
            self.reference_nfe = check_nfe(self.reference_nfe, "reference_nfe")
        check_runtime_settings(self)

    @property
    def samples(self) -> int:
        """The search batch size."""
        return self.num_samples or self.default_samples

    @property
    def run_path(self) -> Path:
        """The run folder."""
        return Path(self.run_dir) if self.run_dir else Path(self.out).with_suffix(".run")

    def check_model(self, testbed: Any) -> None:
        """Refuse settings the model cannot run (before a run folder is claimed).

        Raises:
            ValueError: a reference or reference_nfe the model does not take.
        """
        check_reference(testbed, self.reference, self.reference_nfe)

    def identity(self, testbed: Any, guidance: float | None, **resolved: Any) -> dict[str, Any]:
        """What determines the result: the model's fingerprint, the resolved guidance and the settings."""
        skip = set(self._HOW) | {"model", "guidance"} | set(resolved)
        return {"model": testbed.fingerprint(), "guidance": guidance, **resolved,
                **{k: v for k, v in dataclasses.asdict(self).items() if k not in skip}}


def settings_from_api(schema: type, api: str, **values: Any) -> Any:
    """A search's settings from keyword arguments, through the config layer as on the command line
    (a wrong type is refused naming its key instead of failing later in a comparison).

    Raises:
        TypeError: an unknown keyword.
        ValueError: a value of the wrong type or out of range (naming the key).
    """
    from fewstep.config import load_config

    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise TypeError(f"{api}() got unknown setting(s) {unknown}; the settings are the fields of {schema.__name__}")
    return load_config(schema, flags=values, flags_source=api)
