"""The run setup every search shares: the model, its guidance, a locked run folder bound to the
search's identity, the resolved config, the fitness (with its reference) and the evaluation log."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from fewstep.config import save_config
from fewstep.eval.testbeds import Testbed, make_testbed
from fewstep.infra.io import lock_work_folder
from fewstep.tuning.search.fitness import Fitness
from fewstep.tuning.search.runlog import SearchLog, check_identity
from fewstep.tuning.search.settings import SearchSettings

__all__ = ["SearchRun", "open_search_run"]


@dataclass
class SearchRun:
    """An open search run.

    Attributes:
        testbed: The model.
        guidance: The resolved CFG scale (the settings', else the model's default).
        run_dir: The run folder (locked while the run is open).
        identity: What determines the result (checked against the folder's ``state.json``).
        state: The saved state of this search, or None for a fresh run.
        fitness: The fitness on the search batch (its reference computed or found).
        records: The evaluations logged so far (a rerun replays them).
    """

    testbed: Testbed
    guidance: float | None
    run_dir: Path
    identity: dict[str, Any]
    state: dict[str, Any] | None
    fitness: Fitness
    records: SearchLog


@contextlib.contextmanager
def open_search_run(cfg: SearchSettings, testbed: Testbed | None, log: Callable[[str], None],
                    **resolved: Any) -> Iterator[SearchRun]:
    """Set up (or resume) a search and hold its run folder's lock until the ``with`` block ends.

    Args:
        cfg: The search's settings.
        testbed: The model (None: ``cfg.model`` on ``cfg.device``).
        log: Where messages go.
        **resolved: Resolved settings recorded in the identity instead of their raw values
            (e.g. the canonical solver label).

    Raises:
        ValueError: settings the model refuses (checked before the folder is claimed), a run
            folder in use or holding another search.
    """
    testbed = testbed or make_testbed(cfg.model, cfg.device)
    guidance = cfg.guidance if cfg.guidance is not None else testbed.default_guidance
    cfg.check_model(testbed)
    run_dir = cfg.run_path
    with lock_work_folder(run_dir, cfg.out, "another fewstep search"):
        identity = cfg.identity(testbed, guidance, **resolved)
        state = check_identity(run_dir / "state.json", identity)
        save_config(cfg, run_dir)
        fitness = Fitness(testbed, cfg.nfe, guidance, cfg.samples, cfg.data_seed, cfg.metric, run_dir,
                          cfg.reference, cfg.reference_nfe, cfg.cache_dir, log)
        yield SearchRun(testbed, guidance, run_dir, identity, state, fitness, SearchLog(run_dir / "search_log.jsonl"))
