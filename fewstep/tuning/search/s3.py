"""``fewstep search usf``: S3, the solver-schedule search of Liu et al. (ICLR 2024).

Evolutionary search over USF solver schedules with a fixed NFE. The population starts from
the hand-set solvers spelled out as schedules (DDIM, DPM-Solver++(2M), Taylor-3M and UniPC
1-3 in both spaces, on seven spacings, ending on clean data or at t_min): all of them are
scored on the first 32 search samples and the best 24 are evaluated in full, with a few
random schedules. Each generation proposes a pool of children of the
best schedules so far (crossover with probability 0.3, then mutation); with the predictor
on, an MLP trained on every evaluation so far ranks the pool (256 children) and only the top
few are sampled in full -- but only in generations where its held-out rank correlation on the
evaluations so far reaches ``predictor_min_rank`` (trained on 32 evaluations it ranks no better
than chance); otherwise, and with it off, the first few are (the plain evolutionary search of
the released code). Right after the initial population (until the step has halved twice) and
then every ``polish_every``-th generation, a generation is instead a compass step on the
timesteps of the best schedule (each gap logit in turn moved by +-step, strategies kept,
until a move improves; the step halves when a whole round brings nothing): at a few NFE the
grid matters as much as the strategies, and random timestep mutations find good grids slowly. Fitness: MSE to the
cached high-NFE reference on the search batch (seeds 100000 and up), or the digits-FD.
The run folder keeps the evaluation log and the random and polish state after every
proposal, so a killed search resumes and ends with the same result.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List

from fewstep.infra.io import read_json, write_json
from fewstep.infra.validation import check_seed
from fewstep.eval.testbeds import Testbed
from fewstep.samplers import GridSpec, SolverSchedule, load_solver_schedule, make_plan
from fewstep.samplers.solvers.usf import spell_out
from fewstep.tuning.search.fitness import Fitness
from fewstep.tuning.search.guard import validate_against_baseline
from fewstep.tuning.search.predictor import FitnessPredictor
from fewstep.tuning.search.run import open_search_run
from fewstep.tuning.search.runlog import SearchLog, save_state
from fewstep.tuning.search.settings import SearchSettings, settings_from_api
from fewstep.tuning.search.space import Candidate, LogSNRAxis, SearchSpace

__all__ = ["USFSearchConfig", "search_usf", "run_usf_search", "hand_set_solvers"]

# The spacings the hand-set solvers of the initial population are spelled out on (with both end points).
HAND_SET_SPACINGS = ("linspace", "leading", "trailing", "logsnr", "time_uniform", "time_quadratic", "karras")


@dataclass
class USFSearchConfig(SearchSettings):
    """Settings of ``fewstep search usf`` (also the schema of ``configs/search/usf*.yaml``).

    Besides those of :class:`~fewstep.tuning.search.settings.SearchSettings` (model, nfe, guidance,
    budget, out, search batch, reference, how to run; the budget counts the initial population):

    Attributes:
        predictor: Rank each generation's pool with the learned predictor, once it has earned it.
        predictor_min_rank: The predictor ranks a generation's pool only when its held-out rank
            correlation (Spearman; trained on the earlier three quarters of the evaluations so
            far, scored on the latest quarter) reaches this; below it the generation is plain
            evolution.
        seed: Seed of the search's own random choices.
        pool: Children proposed per generation (the predictor ranks them all; plain evolution
            samples the first ``per_generation``).
        per_generation: Children evaluated per generation.
        warmup: Evaluations before the predictor is trusted.
        parents: Size of the elite that parents are drawn from.
        crossover: Probability that a child starts as a crossover of two parents.
        init_screen: Samples (the first of the search batch) on which every hand-set solver
            (each spelled out on seven spacings and both end points) is screened; the best
            ``init_size`` are evaluated in full as the initial population (0: all of them are).
        init_size: Hand-set schedules kept after the screen.
        init_spacings: The spacings the hand-set solvers are spelled out on.
        random_init: Random schedules added to the initial population.
        polish_every: Every this many generations, a compass step on the best schedule's
            timesteps instead of an evolutionary one (0: never).
        polish_first: Compass rounds only, right after the initial population, until the step
            has halved twice: the grid first, then the strategies.
        polish_step: First compass step (in gap logits); halved when a round does not improve.
        polish_min_step: No more compass rounds once the step is below this.
        analytic_first_step: Allow the analytical first step.
        free_start: Let the first timestep move below the noisiest time (the released search
            keeps it at T; diffusers' ``leading`` spacing does not).
        max_order: Highest Taylor order.
        init: Extra schedule files to start from (a warm start).
    """

    out: str = "runs/usf-schedule.json"
    predictor: bool = True
    predictor_min_rank: float = 0.3
    seed: int = 0
    pool: int = 256
    per_generation: int = 4
    warmup: int = 32
    parents: int = 10
    crossover: float = 0.3
    init_screen: int = 32
    init_size: int = 24
    init_spacings: List[str] = field(default_factory=lambda: list(HAND_SET_SPACINGS))
    random_init: int = 8
    polish_every: int = 3
    polish_first: bool = True
    polish_step: float = 0.5
    polish_min_step: float = 0.02
    analytic_first_step: bool = True
    free_start: bool = True
    max_order: int = 4
    init: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seed = check_seed(self.seed)
        for key, lo in (("pool", 1), ("per_generation", 1), ("warmup", 2), ("parents", 2)):
            if getattr(self, key) < lo:
                raise ValueError(f"{key} must be >= {lo}, got {getattr(self, key)}")
        if self.per_generation > self.pool:
            raise ValueError(f"per_generation ({self.per_generation}) cannot exceed pool ({self.pool})")
        if not -1 <= self.predictor_min_rank <= 1:
            raise ValueError(f"predictor_min_rank is a rank correlation in [-1, 1], got {self.predictor_min_rank}")
        if not 0 <= self.crossover <= 1:
            raise ValueError(f"crossover must be a probability in [0, 1], got {self.crossover}")
        if not 1 <= self.max_order <= 4:
            raise ValueError(f"max_order must be 1 to 4, got {self.max_order}")
        if self.init_screen < 0 or self.init_screen == 1 or self.init_size < 1:
            raise ValueError(f"need init_screen = 0 or >= 2 and init_size >= 1, got {self.init_screen}, "
                             f"{self.init_size}")
        bad = [sp for sp in self.init_spacings if sp not in HAND_SET_SPACINGS]
        if bad:
            raise ValueError(f"init_spacings {bad} are not among {', '.join(HAND_SET_SPACINGS)}")
        if self.random_init < 0:
            raise ValueError(f"random_init must be >= 0, got {self.random_init}")
        if self.polish_every < 0:
            raise ValueError(f"polish_every must be >= 0 (0: no compass rounds), got {self.polish_every}")
        if not 0 < self.polish_min_step <= self.polish_step:
            raise ValueError(f"need 0 < polish_min_step <= polish_step, got {self.polish_min_step}, "
                             f"{self.polish_step}")


def hand_set_solvers():
    """Every hand-set solver usf can spell out: DDIM, DPM-Solver++(2M) and Taylor (3M), UniPC 1-3."""
    yield "ddim", {}
    for space in ("data", "noise"):
        for variant in ("midpoint", "heun"):
            yield "dpmpp", {"space": space, "variant": variant}
        yield "dpmpp", {"order": 3, "third_order": "taylor", "space": space}
        for order, variant, corrector in itertools.product((1, 2, 3), ("bh1", "bh2"), (True, False)):
            yield "unipc", {"order": order, "variant": variant, "space": space, "corrector": corrector}


def _initial(space: SearchSpace, fitness: Fitness, cfg: USFSearchConfig, rng: random.Random, run_dir: Path,
             log: Callable[[str], None]) -> list[tuple[Candidate, str]]:
    """Hand-set solvers on every spacing and end point (screened on a few samples), init files, random draws."""
    hand = {}
    for spacing, final in itertools.product(cfg.init_spacings, space.finals):
        for solver, options in hand_set_solvers():
            try:
                grid = make_plan(fitness.schedule, solver, nfe=cfg.nfe, spacing=GridSpec(
                    spacing=spacing, final_sigma=final, convention="multistep"), **options).grid
                c = space.candidate(SolverSchedule.from_grid(grid, spell_out(solver, grid, **options)))
            except ValueError:  # a spacing this schedule does not have, or no usable stencil
                continue
            label = f"{solver}({','.join(f'{k}={v}' for k, v in options.items())})@{spacing}/{final}"
            hand.setdefault(c.key(), (c, label))
    hand = list(hand.values())
    if cfg.init_screen and len(hand) > cfg.init_size:
        screen = _screen(space, fitness, cfg, hand, run_dir, log)
        hand = sorted(hand, key=lambda cl: (screen[cl[1]], cl[1]))[: cfg.init_size]
    out = hand
    for path in cfg.init:
        s = load_solver_schedule(path)
        if s.nfe != cfg.nfe:
            raise ValueError(f"init schedule {path} has NFE {s.nfe}, the search {cfg.nfe}")
        out.append((space.candidate(s), f"init:{path}"))
    out += [(space.random(rng), "random") for _ in range(cfg.random_init)]
    seen, unique = set(), []
    for c, label in out:
        if c.key() not in seen:
            seen.add(c.key())
            unique.append((c, label))
    return unique


def _screen(space: SearchSpace, fitness: Fitness, cfg: USFSearchConfig, hand: list[tuple[Candidate, str]],
            run_dir: Path, log: Callable[[str], None]) -> dict[str, float]:
    """Fitness of every hand-set candidate on the first ``init_screen`` samples (kept in screen.json)."""
    path = run_dir / "screen.json"
    record = read_json(path) if path.exists() else {"scores": {}, "seconds": 0.0}
    scores = record["scores"]
    cheap = Fitness(fitness.testbed, cfg.nfe, fitness.guidance, cfg.init_screen, cfg.data_seed, cfg.metric,
                    run_dir / "screen", cfg.reference, cfg.reference_nfe, cfg.cache_dir, log)
    todo = [(c, label) for c, label in hand if label not in scores]
    if todo:
        log(f"screening {len(hand)} hand-set schedules on {cfg.init_screen} samples "
            f"(the best {cfg.init_size} start the search)")
    from tqdm.auto import tqdm

    for n, (c, label) in enumerate(tqdm(todo, desc=f"S3 screen NFE {cfg.nfe}", unit="schedule",
                                        disable=not cfg.progress or not todo, leave=False)):
        start = time.perf_counter()
        scores[label] = cheap("usf", {"solver_schedule": space.schedule(c)})
        record["seconds"] += time.perf_counter() - start
        if n % 25 == 24 or n == len(todo) - 1:
            write_json(path, record)
    return {k: (math.inf if v is None else v) for k, v in scores.items()}


def _propose(space: SearchSpace, cfg: USFSearchConfig, rng: random.Random, population: list[tuple[Candidate, float]],
             seen: set[str]) -> list[tuple[Candidate, str]]:
    ranked = sorted(range(len(population)), key=lambda i: (population[i][1], i))
    elite = [population[i][0] for i in ranked[: cfg.parents] if math.isfinite(population[i][1])]
    elite = elite or [population[ranked[0]][0]]
    pool, keys = [], set()
    for _ in range(20 * cfg.pool):
        if len(pool) == cfg.pool:
            break
        if len(elite) > 1 and rng.random() < cfg.crossover:
            a, b = rng.sample(elite, 2)
            child, origin = space.mutate(rng, space.crossover(rng, a, b)), "crossover"
        else:
            child, origin = space.mutate(rng, rng.choice(elite)), "mutation"
        if child.key() not in seen and child.key() not in keys:
            keys.add(child.key())
            pool.append((child, origin))
    return pool


def run_usf_search(cfg: USFSearchConfig, testbed: Testbed | None = None, log: Callable[[str], None] = print
                   ) -> SolverSchedule:
    """Run (or resume) S3 and write ``cfg.out``; returns the best schedule found.

    Raises:
        ValueError: bad settings, a run folder holding another search, or a corrupt log.
    """
    with open_search_run(cfg, testbed, log) as run:
        run_dir, identity, state, fitness, records = run.run_dir, run.identity, run.state, run.fitness, run.records
        space = SearchSpace(LogSNRAxis(fitness.schedule), cfg.nfe,
                            cfg.analytic_first_step and fitness.analytic_first_step_allowed, cfg.max_order,
                            free_start=cfg.free_start)
        rng = random.Random(cfg.seed)
        population = [(Candidate.from_dict(e["candidate"]), _fitness(e)) for e in records.entries]
        seen = {c.key() for c, _ in population}
        if state is None:
            pending = [(c, origin, None) for c, origin in _initial(space, fitness, cfg, rng, run_dir, log)]
            state = _save(run_dir, identity, rng, 0, len(records), pending,
                          {"step": cfg.polish_step, "best": None, "round": 0})
        rng.setstate(_rng_state(state["rng"]))
        generation, polish = state["generation"], state["polish"]
        pending = [(Candidate.from_dict(p["candidate"]), p["origin"], p["predicted"]) for p in state["pending"]]
        if state["logged"] > len(records):  # lines lost (a restored backup, an edited log): not a kill -9
            raise ValueError(f"{records.path} holds {len(records)} evaluations but {run_dir / 'state.json'} says "
                             f"{state['logged']} were logged; the run folder is inconsistent (delete it to start over)")
        done = records.entries[state["logged"]:]
        if len(done) > len(pending) or any(e["candidate"] != c.to_dict() for e, (c, _, _) in zip(done, pending)):
            raise ValueError(f"{records.path} does not continue {run_dir / 'state.json'}; the run folder is "
                             "inconsistent (delete it to start over)")
        pending = pending[len(done):]
        for e in done:
            pending = _after_polish_move(pending, polish, e["origin"], _fitness(e))
        if len(records):
            log(f"resuming: {len(records)} of {cfg.budget} evaluations already in {records.path}")
        from tqdm.auto import tqdm

        clock = time.perf_counter()
        with tqdm(total=cfg.budget, initial=min(len(records), cfg.budget), desc=f"S3 NFE {cfg.nfe}",
                  unit="eval", disable=not cfg.progress) as bar:
            while len(records) < cfg.budget:
                if not pending:
                    generation += 1
                    pending = _polish_round(space, cfg, population, seen, polish, generation)
                    if not pending:
                        pool = _propose(space, cfg, rng, population, seen)
                        if not pool:
                            log("the search space is exhausted around the elite: stopping early")
                            break
                        pending = _select(pool, population, cfg, space, generation)
                    _save(run_dir, identity, rng, generation, len(records), pending, polish)
                cand, origin, predicted = pending.pop(0)
                start = time.perf_counter()
                value = fitness("usf", {"solver_schedule": space.schedule(cand)})
                now = time.perf_counter()
                records.append({"i": len(records), "generation": generation, "origin": origin, "fitness": value,
                                "predicted": predicted, "seconds": now - start, "elapsed": now - clock,
                                "candidate": cand.to_dict()})
                clock = now
                population.append((cand, value))
                seen.add(cand.key())
                pending = _after_polish_move(pending, polish, origin, value)
                best = min(v for _, v in population)
                bar.set_postfix_str(f"best {cfg.metric} {best:.4g}")
                bar.update()
        return _finish(cfg, run_dir, records, population, space, fitness, log)


def _polish_round(space: SearchSpace, cfg: USFSearchConfig, population: list[tuple[Candidate, float]],
                  seen: set[str], polish: dict[str, Any], generation: int) -> list[tuple[Candidate, str, None]]:
    """The compass stencil around the best schedule, on polish generations (updates ``polish``)."""
    first_phase = cfg.polish_first and polish["step"] > cfg.polish_step / 4
    if not first_phase and (not cfg.polish_every or generation % cfg.polish_every):
        return []
    if polish["step"] < cfg.polish_min_step:
        return []
    best_i = min(range(len(population)), key=lambda i: (population[i][1], i))
    best_c, best_v = population[best_i]
    if polish["best"] is not None and not best_v < polish["best"]:
        polish["step"] /= 2  # the last round (and everything since) found nothing better
        if polish["step"] < cfg.polish_min_step:
            return []
    polish["best"] = best_v
    stencil = space.polish_moves(best_c, polish["step"])
    first = 2 * (polish["round"] % (len(stencil) // 2))  # coordinates in turn, as a cyclic compass search
    polish["round"] += 1
    moves, keys = [], set()
    for c in stencil[first:] + stencil[:first]:
        if c.key() not in seen and c.key() not in keys:
            keys.add(c.key())
            moves.append((c, f"polish {polish['step']:g}", None))
    return moves


def _after_polish_move(pending: list[tuple[Candidate, str, float | None]], polish: dict[str, Any], origin: str,
                       value: float) -> list[tuple[Candidate, str, float | None]]:
    """Greedy compass: the first move that beats the round's start ends the round."""
    if origin.startswith("polish") and polish["best"] is not None and value < polish["best"]:
        return [p for p in pending if not p[1].startswith("polish")]
    return pending


def _select(pool: list[tuple[Candidate, str]], population: list[tuple[Candidate, float]], cfg: USFSearchConfig,
            space: SearchSpace, generation: int) -> list[tuple[Candidate, str, float | None]]:
    if not cfg.predictor or len(population) < cfg.warmup:
        return [(c, origin, None) for c, origin in pool[: cfg.per_generation]]
    skill = predictor_skill(population, space.nfe + 1, cfg.seed, generation)
    if not skill >= cfg.predictor_min_rank:  # not (yet) better than chance: plain evolution this generation
        return [(c, f"{origin} (predictor rank {skill:.2f}, off)", None) for c, origin in pool[: cfg.per_generation]]
    predictor = FitnessPredictor(space.nfe + 1, seed=cfg.seed).fit([c for c, _ in population],
                                                                   [v for _, v in population], generation)
    scores = predictor.predict([c for c, _ in pool])
    order = sorted(range(len(pool)), key=lambda i: (scores[i], i))
    return [(pool[i][0], f"{pool[i][1]} (predictor rank {skill:.2f})", math.exp(scores[i]))
            for i in order[: cfg.per_generation]]


def predictor_skill(population: list[tuple[Candidate, float]], max_steps: int, seed: int, round_: int) -> float:
    """Held-out Spearman correlation of the predictor: trained on the earlier three quarters of the
    evaluations, scored on the latest quarter (the children of the current elite it will rank)."""
    held = max(8, len(population) // 4)
    train, test = population[:-held], population[-held:]
    if len(train) < 8:
        return -1.0
    pred = FitnessPredictor(max_steps, seed=seed).fit([c for c, _ in train], [v for _, v in train], round_)
    guess = pred.predict([c for c, _ in test])
    finite = [math.log(v) for _, v in population if math.isfinite(v) and v > 0]
    worst = max(finite, default=0.0) + 1.0
    truth = [math.log(v) if math.isfinite(v) and v > 0 else worst for _, v in test]
    return _spearman(guess, truth)


def _spearman(a: list[float], b: list[float]) -> float:
    rank = lambda v: sorted(range(len(v)), key=lambda i: (v[i], i))  # noqa: E731
    ra, rb = [0] * len(a), [0] * len(b)
    for r, i in enumerate(rank(a)):
        ra[i] = r
    for r, i in enumerate(rank(b)):
        rb[i] = r
    n = len(a)
    mean = (n - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var > 0 else 0.0


def _save(run_dir: Path, identity: dict[str, Any], rng: random.Random, generation: int, logged: int,
          pending: list[tuple[Candidate, str, float | None]], polish: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = rng.getstate()
    state = {"identity": identity, "rng": [version, list(internal), gauss], "generation": generation,
             "polish": polish, "logged": logged, "pending": [{"candidate": c.to_dict(), "origin": o, "predicted": p}
                                           for c, o, p in pending]}
    save_state(run_dir / "state.json", state)
    return state


def _rng_state(saved: list) -> tuple:
    return saved[0], tuple(saved[1]), saved[2]


def _fitness(entry: dict[str, Any]) -> float:
    v = entry.get("fitness")
    return math.inf if v is None else float(v)


def _finish(cfg: USFSearchConfig, run_dir: Path, records: SearchLog, population: list[tuple[Candidate, float]],
            space: SearchSpace, fitness: Fitness, log: Callable[[str], None]) -> SolverSchedule:
    values = [v for _, v in population]
    if not any(math.isfinite(v) for v in values):
        raise ValueError("every evaluated schedule diverged; check the model and the guidance")
    best_i = min(range(len(values)), key=lambda i: (values[i], i))
    init_best = min((v for e, v in zip(records.entries, values) if e["generation"] == 0), default=math.inf)
    screen = read_json(run_dir / "screen.json") if (run_dir / "screen.json").exists() else {"scores": {}, "seconds": 0}
    num_samples = cfg.samples
    summary = {
        "best_fitness": values[best_i], "metric": cfg.metric, "evaluations": len(values),
        "screened": len(screen["scores"]), "screen_seconds": screen["seconds"],
        "screen_in_full_evaluations": len(screen["scores"]) * cfg.init_screen / num_samples,
        "evaluations_to_best": best_i + 1, "best_origin": records.entries[best_i]["origin"],
        "initial_population_best": init_best, "predictor": cfg.predictor,
        "seconds": sum(e.get("elapsed", 0.0) for e in records.entries) + screen["seconds"],
        "search_seeds": [cfg.data_seed, cfg.data_seed + num_samples],
    }
    hand = [i for i, e in enumerate(records.entries) if e["generation"] == 0 and _hand_set(e["origin"])]
    base_i = min(hand, key=lambda i: (values[i], i)) if hand else best_i
    summary["baseline"] = records.entries[base_i]["origin"]
    summary["baseline_fitness"] = values[base_i]
    record = validate_against_baseline(
        cfg, fitness.testbed, fitness.guidance, run_dir, ("usf", {"solver_schedule": space.schedule(population[best_i][0])}),
        ("usf", {"solver_schedule": space.schedule(population[base_i][0])}), f"S3 ({records.entries[best_i]['origin']})",
        f"best hand-set {records.entries[base_i]['origin']}", log)
    chosen = best_i if record["written"] == "tuned" else base_i
    sched = space.schedule(population[chosen][0], fitness.meta("usf", search=summary, validation=record))
    sched.save(cfg.out)
    write_json(run_dir / "result.json", {**summary, "validation": record, "schedule": str(cfg.out)})
    log(f"best {cfg.metric} {values[best_i]:.5g} after {len(values)} evaluations (found at evaluation {best_i + 1}, "
        f"{summary['best_origin']}); hand-set start: {init_best:.5g}; wrote {cfg.out}"
        + ("" if chosen == best_i else f" (the baseline {records.entries[base_i]['origin']})"))
    if all(e["generation"] == 0 for e in records.entries):
        log(f"note: the budget ({cfg.budget}) did not get past the initial population: the result is its best "
            "schedule, no search step ran (raise --budget)")
    return sched


def _hand_set(origin: str) -> bool:
    """Whether a log entry's origin is a hand-set solver of the initial population."""
    return "@" in origin and not origin.startswith(("init:", "random"))


def search_usf(model: "str | Testbed" = "digits", nfe: int = 5, guidance: float | None = None, budget: int = 200,
               out: str = "runs/usf-schedule.json", *, predictor: bool = True, log: Callable[[str], None] = print,
               **settings: Any) -> SolverSchedule:
    """Search a USF solver schedule with S3 and write it to ``out``.

    Args:
        model: ``digits``, ``gmm``, ``gmm-flow``, a pipeline folder, or a testbed object.
        nfe: Model evaluations of the schedule.
        guidance: CFG scale (None: the model's default).
        budget: Full evaluations.
        out: The schedule file (.json / .yaml); the run folder is ``out`` without suffix + ``.run``.
        predictor: Rank candidates with the learned predictor.
        log: Where messages go.
        **settings: Any other field of :class:`USFSearchConfig` (``seed``, ``num_samples``, ...).

    Returns:
        The best schedule found (``fewstep.sample(..., solver="usf", solver_schedule=...)``).
    """
    testbed = model if isinstance(model, Testbed) else None
    name = testbed.name if testbed is not None else str(model)
    cfg = settings_from_api(USFSearchConfig, "search_usf", model=name, nfe=nfe, guidance=guidance, budget=budget,
                            out=str(out), predictor=predictor, **settings)
    return run_usf_search(cfg, testbed, log)
