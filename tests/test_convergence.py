"""Empirical convergence order on an analytic Gaussian mixture with a near-exact reference.

Error is the RMS distance at the final time to a 2000-step RK4 solution of the same
probability-flow ODE; the order is the fitted slope of log error vs log NFE.
"""

import numpy as np
import pytest

from fewstep.eval.convergence import ConvergenceStudy, fitted_order

NFES = [20, 28, 40, 56, 80]
CASES = {
    "linear": dict(schedule="linear", prediction="epsilon"),
    "flow": dict(schedule="flow", prediction="flow", t_start=0.999, t_end=0.002),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def study(request):
    return ConvergenceStudy(**CASES[request.param])


@pytest.mark.parametrize(
    "solver,options,expected",
    [
        ("ddim", {}, 1),
        ("dpmpp", {"order": 1}, 1),
        ("dpmpp", {"order": 2}, 2),
        ("dpmpp", {"order": 2, "variant": "heun"}, 2),
        ("dpmpp", {"order": 2, "space": "noise"}, 2),
        # UniP-p alone is order p ...
        ("unipc", {"order": 3, "corrector": False}, 3),
        ("unipc", {"order": 2, "corrector": False}, 2),
        # ... and the corrector adds one order for free (UniPC-p has order p + 1).
        ("unipc", {"order": 1}, 2),
        ("unipc", {"order": 2}, 3),
        ("unipc", {"order": 3}, 4),
        ("unipc", {"order": 3, "variant": "bh1"}, 4),
    ],
)
def test_empirical_order(study, solver, options, expected):
    if solver != "ddim":
        options = {"lower_order_final": False, **options}
    errs = study.errors(solver, NFES, **options)
    assert np.all(np.diff(errs) < 0), f"error must shrink with NFE: {errs}"
    order = fitted_order(NFES, errs)
    assert abs(order - expected) <= 0.3, f"fitted order {order:.2f}, expected {expected}"


def test_third_order_dpmpp_beats_second_order(study):
    # DPM-Solver++(3M) starts with a first-order step, so its asymptotic global order is 2;
    # it must still be more accurate than 2M at every NFE.
    e2 = study.errors("dpmpp", NFES, order=2, lower_order_final=False)
    e3 = study.errors("dpmpp", NFES, order=3, lower_order_final=False)
    assert np.all(e3 < e2) and fitted_order(NFES, e3) > 2 - 0.3


def test_reference_is_converged(study):
    finer = study.mixture.ode_solution(study.x_T, *study.endpoints(), steps=2 * study.reference_steps)
    assert (finer - study.reference).abs().max().item() < 1e-9


def test_taylor_third_order_dpmpp_is_third_order(study):
    errs = study.errors("dpmpp", NFES, order=3, third_order="taylor", lower_order_final=False)
    assert abs(fitted_order(NFES, errs) - 3) <= 0.3
    assert np.all(errs < study.errors("dpmpp", NFES, order=3, lower_order_final=False))
