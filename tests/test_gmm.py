"""The analytic Gaussian-mixture model: exact eps/x0 and its reference ODE solution."""


import pytest
import torch

import fewstep
from fewstep.zoo.gmm import GaussianMixture, GMMModel


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(dim=3, components=5, num_classes=2, seed=3)


@pytest.mark.parametrize("alpha,sigma", [(0.9, 0.3), (0.3, 0.95), (1.0, 0.05), (0.0, 1.0)])
@pytest.mark.parametrize("labels", [None, torch.tensor([0, 1, -1, 1])])
def test_eps_is_minus_sigma_times_finite_difference_score(mixture, alpha, sigma, labels):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, eps = mixture.denoise(x, alpha, sigma, labels)
    h = 1e-5
    grad = torch.zeros_like(x)
    for d in range(3):
        e = torch.zeros_like(x)
        e[:, d] = h
        grad[:, d] = (mixture.log_prob(x + e, alpha, sigma, labels) - mixture.log_prob(x - e, alpha, sigma, labels)) / (2 * h)
    torch.testing.assert_close(eps, -sigma * grad, rtol=1e-6, atol=1e-7)


def test_x0_and_eps_are_consistent_and_finite_at_the_ends(mixture):
    x = torch.randn(6, 3, dtype=torch.float64)
    x0, eps = mixture.denoise(x, 0.6, 0.8)
    torch.testing.assert_close(0.6 * x0 + 0.8 * eps, x)
    x0, eps = mixture.denoise(x, 0.0, 1.0)  # pure noise: x0 is the prior mean, eps = x
    torch.testing.assert_close(eps, x)
    prior_mean = (mixture.log_weights.exp()[:, None] * mixture.means).sum(0)
    torch.testing.assert_close(x0, prior_mean.expand(6, 3))
    x0, _ = mixture.denoise(x, 1.0, 0.0)  # clean: x0 = x
    torch.testing.assert_close(x0, x)


def test_class_conditional_sampling_uses_only_that_class(mixture):
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(2000, dtype=torch.long)
    x = mixture.sample(2000, g, labels)
    comps = mixture.means[mixture.classes == 0]
    nearest = torch.cdist(x, mixture.means).argmin(1)
    assert (mixture.classes[nearest] == 0).float().mean() > 0.9
    assert comps.shape[0] >= 1


def test_ode_solution_inverts_and_converges(mixture):
    x = torch.randn(8, 3, dtype=torch.float64)
    start, end = (0.05, 0.9987), (0.995, 0.0998)
    fwd = mixture.ode_solution(x, start, end, steps=800)
    back = mixture.ode_solution(fwd, end, start, steps=800)
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)  # the flow is a bijection
    fine = mixture.ode_solution(x, start, end, steps=1600)
    assert (fine - fwd).abs().max() < 1e-9


@pytest.mark.parametrize("prediction,schedule", [("epsilon", "linear"), ("v_prediction", "scaled_linear"),
                                                 ("sample", "vp_cosine"), ("flow", "flow"), ("epsilon", "ve")])
def test_model_outputs_convert_back_to_the_exact_x0(mixture, prediction, schedule):
    model = GMMModel(mixture, schedule, prediction)
    sched = model.schedule
    t = torch.tensor([0.3 * sched.t_min + 0.7 * sched.t_max] * 4, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    x = torch.randn(4, 3, dtype=torch.float64)
    out = model(x, sched.model_time(t), torch.tensor([0, 1, -1, 0]))
    cx, co = fewstep.samplers.prediction.x0_coefficients(prediction, alpha, sigma)
    x0, _ = mixture.denoise(x, alpha, sigma, torch.tensor([0, 1, -1, 0]))
    torch.testing.assert_close(cx[:, None] * x + co[:, None] * out, x0)


def test_guided_sampling_approaches_guided_reference(mixture):
    sched = fewstep.make_schedule("linear")
    model = GMMModel(mixture, sched, "epsilon")
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1] * 4)
    spec = fewstep.GridSpec(spacing="logsnr", final_sigma="min")
    g = fewstep.build_grid(sched, 1, spec)
    ref = mixture.ode_solution(x_T, (float(g.alpha[0]), float(g.sigma[0])), (float(g.alpha[1]), float(g.sigma[1])),
                               labels=labels, guidance=3.0, steps=1000)
    errs = [
        (fewstep.sample(model, x_T, schedule=sched, solver="unipc", nfe=n, spacing=spec, guidance=3.0, cond=labels,
                        uncond=torch.full_like(labels, -1), order=3) - ref).abs().max().item()
        for n in (25, 100)
    ]
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 10


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([1.0, -1.0], [[0.0], [1.0]], [[1.0], [1.0]])
    m = GaussianMixture.random(dim=2, components=2)
    with pytest.raises(ValueError, match="no classes"):
        m.denoise(torch.zeros(1, 2), 1.0, 0.5, torch.tensor([0]))
    with pytest.raises(ValueError, match="3 dimensions, the mixture 2"):
        m.denoise(torch.zeros(1, 3), 1.0, 0.5)
