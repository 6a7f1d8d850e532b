"""Full-size checks behind README numbers (run with ``python -m pytest -m slow``)."""

import pytest

pytestmark = pytest.mark.slow


def test_digits_quality_bar_at_full_size():
    from fewstep.zoo.digits_train import evaluate

    r = evaluate(nfe=100, n=1000)
    assert r["accuracy"] >= 0.9 and r["min_class_accuracy"] >= 0.8
    # "close to the FD between two halves of the real data"
    assert r["fd_samples_vs_real_half"] <= 1.5 * r["fd_real_half_vs_half"]


def test_fewstep_schedulers_through_the_digits_pipeline_match_the_functional_path():
    import torch

    import fewstep
    from fewstep.eval.testbeds import DigitsTestbed
    from fewstep.zoo.digits import load_digits_pipeline

    bed = DigitsTestbed()
    x_T, labels = bed.initial_noise(50, seed=0)
    # (DDIMSolverScheduler reproduces DDIMScheduler's own grid; compare puts every solver on one grid.)
    for cls, solver in [(fewstep.DPMSolverPPScheduler, "dpmpp"), (fewstep.UniPCScheduler, "unipc")]:
        pipe = load_digits_pipeline(cls)
        pipe.set_progress_bar_config(disable=True)
        via_pipeline = pipe(labels, guidance_scale=1.5, num_inference_steps=8, latents=x_T,
                            output_type="pt").images
        via_sample = bed.generate(solver, {}, 8, x_T, labels, 1.5, pipe.scheduler.config.timestep_spacing)
        torch.testing.assert_close(via_pipeline, via_sample.clamp(-1, 1), rtol=1e-4, atol=1e-4)
