"""Regression: a plain ratio list takes the solver's dc_order (it was checked against the default order first)."""

import pytest
import torch

import fewstep
from fewstep.zoo.gmm import GaussianMixture, GMMModel

MODEL = GMMModel(GaussianMixture.random(dim=4, components=3, seed=1))
RATIOS = [1.0, 0.9, 1.1, 1.0, 0.95, 1.0]  # ratio 2 of 6 is free with dc_order=1, a warm-up step with dc_order=2


def test_a_plain_list_with_dc_order_1_is_accepted_and_equals_the_artifact():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    from_list = fewstep.sample(MODEL, x, solver="dc", nfe=6, ratios=RATIOS, dc_order=1)
    from_artifact = fewstep.sample(MODEL, x, solver="dc", nfe=6, ratios=fewstep.DCRatios(RATIOS, dc_order=1),
                                   dc_order=1)
    assert torch.equal(from_list, from_artifact)
    assert not torch.equal(from_list, fewstep.sample(MODEL, x, solver="unipc", nfe=6))
    solver = fewstep.get_solver("dc", ratios=RATIOS, dc_order=1)
    assert solver.config["ratios"].dc_order == 1 and solver.config["ratios"].ratios == RATIOS


def test_the_same_list_with_the_default_order_is_rejected_naming_the_order():
    with pytest.raises(ValueError, match=r"option ratios of solver 'dc': ratios\[1\]=0.9: the first dc_order=2"):
        fewstep.get_solver("dc", ratios=RATIOS)
    with pytest.raises(ValueError, match=r"ratios\[0\]=0.9: the first dc_order=1"):
        fewstep.get_solver("dc", ratios=[0.9, *RATIOS[1:]], dc_order=1)
