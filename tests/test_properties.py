"""Property tests: any input either works (finite, right shape and dtype) or fails clearly.

For arbitrary arguments to ``fewstep.sample``, ``get_solver``/``make_plan`` and
``FewstepScheduler.from_config``/``set_timesteps``/``step`` the result is a finite tensor of
the right shape and dtype, or a ValueError/TypeError/FloatingPointError raised by fewstep
itself (not from inside torch, numpy or Python) whose message names what was wrong.

Profiles (tests/conftest.py): ``fast`` (default, CI) runs 500 examples per property;
``HYPOTHESIS_PROFILE=slow`` runs 5000.
"""

from __future__ import annotations

import math
import traceback

import torch

import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fewstep
from fewstep import FewstepScheduler, GridSpec
from fewstep.samplers.registry import list_solvers, solver_class
from fewstep.samplers.timesteps import SPACINGS

ERRORS = (ValueError, TypeError, FloatingPointError)
# Words an error may use to name what was wrong besides the argument's own name.
_GENERIC = ("option", "solver", "x_T", "sample", "model output", "timestep", "sigma", "alpha", "cond", "step",
            "grid", "schedule", "guidance", "spacing", "prediction", "nfe", "plan", "config", "shift", "mu")

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([0, -1, 10**7]),
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.text(max_size=3),
    st.lists(st.integers(-2, 5), max_size=3), st.just({"a": 1}),
)


def _maybe(valid):
    """``valid`` nine times in ten, junk otherwise."""
    return st.integers(0, 9).flatmap(lambda k: valid if k else _junk)


dtypes = st.integers(0, 9).flatmap(
    lambda k: st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]) if k else st.just(torch.int64))
shapes = st.integers(0, 9).flatmap(lambda k: st.lists(st.integers(0, 3), min_size=1, max_size=3) if k else st.just([]))


def bounded_model(x, t, *cond):
    return 0.5 * torch.tanh(x) + 0.1


def _names_the_problem(exc: BaseException, given_names: set[str]) -> bool:
    msg = str(exc)
    return any(name in msg for name in given_names | set(_GENERIC))


def _raised_by_fewstep(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and "/fewstep/" in frames[-1].filename.replace("\\", "/")


def _check_outcome(call, given_names: set[str], x_T=None):
    try:
        out = call()
    except ERRORS as exc:
        hypothesis.event(f"{type(exc).__name__}: {str(exc)[:40]}")
        assert _raised_by_fewstep(exc), f"{type(exc).__name__} from outside fewstep: {exc}"
        assert _names_the_problem(exc, given_names), f"message names nothing given ({sorted(given_names)}): {exc}"
        return None
    hypothesis.event("ok")
    if x_T is not None:
        assert isinstance(out, torch.Tensor) and out.shape == x_T.shape and out.dtype == x_T.dtype
        assert bool(torch.isfinite(out.float()).all())
    return out


_SCHEDULE_KINDS = {"linear": "vp", "scaled_linear": "vp", "squaredcos_cap_v2": "vp", "vp_linear": "vpc",
                   "vp_cosine": "vpc", "flow": "flow", "ve": "ve", "edm": "ve"}
_PREDICTIONS = {"vp": ["epsilon", "v_prediction", "sample"], "vpc": ["epsilon", "v_prediction", "sample"],
                "flow": ["flow", "flow_prediction", "sample"], "ve": ["epsilon", "sample"]}
_SPACINGS = {"vp": list(SPACINGS), "vpc": ["logsnr", "time_uniform", "time_quadratic", "karras", "exponential"],
             "flow": ["linspace", "logsnr", "time_uniform", "time_quadratic", "karras", "exponential"],
             "ve": ["logsnr", "time_uniform", "time_quadratic", "karras", "exponential"]}


@st.composite
def valid_solver_options(draw, solver):
    options = {}
    for name, opt in solver_class(solver).options.items():
        if not draw(st.booleans()):
            continue
        if opt.choices:
            options[name] = draw(st.sampled_from(opt.choices))
        elif opt.bounds and opt.kind == "int":
            options[name] = draw(st.integers(int(opt.bounds[0]), int(opt.bounds[1])))
        elif opt.kind == "bool":
            options[name] = draw(st.booleans())
        elif opt.kind == "int_list":
            options[name] = draw(st.lists(st.integers(0, 12), max_size=3))
    return options


@st.composite
def sample_arguments(draw):
    """Consistent valid arguments; in 40% of draws one argument is replaced by junk."""
    schedule = draw(st.sampled_from(sorted(_SCHEDULE_KINDS)))
    kind = _SCHEDULE_KINDS[schedule]
    solver = draw(st.sampled_from(list_solvers()))
    kwargs = dict(schedule=schedule, solver=solver, prediction=draw(st.sampled_from(_PREDICTIONS[kind])),
                  nfe=draw(st.integers(1, 12)), **draw(valid_solver_options(solver)))
    spacing = draw(st.sampled_from(_SPACINGS[kind]))
    if draw(st.booleans()):
        kwargs["spacing"] = GridSpec(spacing=spacing, rho=draw(st.floats(1.0, 10.0)),
                                     final_sigma=draw(st.sampled_from(["zero", "min"])))
    else:
        kwargs["spacing"] = spacing
    if kind == "flow" and draw(st.booleans()):
        kwargs[draw(st.sampled_from(["shift", "mu"]))] = draw(st.floats(0.2, 3.0))
    if draw(st.integers(0, 3)) == 0:
        kwargs["guidance"] = draw(st.floats(-2, 12))
    if draw(st.integers(0, 4)) == 0:
        kwargs["thresholding"] = fewstep.DynamicThreshold(draw(st.floats(0.5, 1.0)), draw(st.floats(1.0, 3.0)))
    if draw(st.integers(0, 9)) < 4:
        key = draw(st.sampled_from(sorted(kwargs) + ["timesteps", "sigmas", "order", "bogus"]))
        kwargs[key] = draw(_junk)
        if key in ("timesteps", "sigmas"):
            kwargs[key] = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4))
            kwargs.pop("nfe")
    return kwargs


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(kwargs=sample_arguments(), shape=shapes, dtype=dtypes)
def test_sample_any_input_works_or_fails_clearly(kwargs, shape, dtype):
    batch = shape[0] if shape else 1
    if "guidance" in kwargs:
        kwargs.update(cond=torch.zeros(batch), uncond=torch.ones(batch))
    x_T = torch.randn(tuple(shape)).to(dtype) if dtype != torch.int64 else torch.ones(tuple(shape), dtype=dtype)
    names = {k for k, v in kwargs.items() if v is not None}
    _check_outcome(lambda: fewstep.sample(bounded_model, x_T, **kwargs), names,
                   x_T if dtype.is_floating_point and shape else None)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(kwargs=sample_arguments())
def test_make_plan_any_input_works_or_fails_clearly(kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k not in ("guidance", "thresholding")}
    plan = _check_outcome(lambda: fewstep.make_plan(**kwargs), set(kwargs))
    if plan is not None:
        for table in (plan.predict, plan.correct, plan.x0_coef):
            assert table is None or bool(torch.isfinite(table).all())
        assert plan.n == len(plan.grid.model_timesteps)


_CONFIG_KEYS = {
    "num_train_timesteps": _maybe(st.sampled_from([1000, 100])),
    "beta_start": _maybe(st.sampled_from([0.0001, 0.00085])),
    "beta_end": _maybe(st.sampled_from([0.02, 0.012])),
    "beta_schedule": _maybe(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"])),
    "prediction_type": _maybe(st.sampled_from(["epsilon", "v_prediction", "sample", "flow_prediction"])),
    "timestep_spacing": _maybe(st.sampled_from(list(SPACINGS))),
    "steps_offset": _maybe(st.sampled_from([0, 1])),
    "final_sigmas_type": _maybe(st.sampled_from(["zero", "sigma_min"])),
    "set_alpha_to_one": _maybe(st.booleans()),
    "rescale_betas_zero_snr": _maybe(st.booleans()),
    "thresholding": _maybe(st.booleans()),
    "clip_sample": _maybe(st.booleans()),
    "shift": _maybe(st.floats(0.5, 5)),
    "use_dynamic_shifting": _maybe(st.booleans()),
    "shift_terminal": _maybe(st.sampled_from([None, 0.1])),
    "use_karras_sigmas": _maybe(st.booleans()),
    "use_exponential_sigmas": _maybe(st.booleans()),
    "use_flow_sigmas": _maybe(st.booleans()),
    "flow_shift": _maybe(st.floats(0.5, 5)),
    "solver_order": _maybe(st.integers(1, 3)),
    "algorithm_type": _maybe(st.sampled_from(["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])),
    "variance_type": _maybe(st.sampled_from([None, "learned_range", "fixed_small"])),
    "_class_name": st.sampled_from(["DDIMScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler",
                                    "LTXEulerAncestralRFScheduler", "EDMEulerScheduler"]),
}


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    config=st.fixed_dictionaries({}, optional=_CONFIG_KEYS),
    solver=st.sampled_from(list_solvers()), options=st.sampled_from(list_solvers()).flatmap(valid_solver_options),
    n=_maybe(st.integers(1, 10)), mu=st.one_of(st.none(), _maybe(st.floats(-2, 2))),
    begin=st.one_of(st.none(), _maybe(st.integers(0, 9))), shape=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
)
def test_scheduler_any_config_works_or_fails_clearly(config, solver, options, n, mu, begin, shape, dtype):
    names = set(config) | set(options) | {"solver", "num_inference_steps", "mu", "begin_index", "variance"}

    def build():
        return FewstepScheduler.from_config(config, solver=solver, **options)

    sched = _check_outcome(build, names)
    if sched is None:
        return
    try:
        sched.set_timesteps(n, mu=mu)
    except ERRORS as exc:
        assert _raised_by_fewstep(exc) and _names_the_problem(exc, names), exc
        assert sched.grid is None and sched.plan is None  # a failed call leaves no half-built state
        return
    if begin is not None and _check_outcome(lambda: sched.set_begin_index(begin), names) is None \
            and sched.begin_index is None:
        return
    x = torch.randn(*shape).to(dtype)
    start = sched.begin_index or 0

    def run():
        y = x
        for t in sched.timesteps[start:]:
            y = sched.step(bounded_model(y, t), t, y).prev_sample
        return y

    _check_outcome(run, names, x)


def test_hypothesis_profile_is_at_least_500_examples():
    assert settings().max_examples >= 500
    assert not math.isnan(settings().max_examples)
