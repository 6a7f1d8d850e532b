"""Real diffusers pipelines (tiny random weights, built offline) with fewstep schedulers swapped in."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from fewstep import DDIMSolverScheduler, DPMSolverPPScheduler, FewstepScheduler, UniPCScheduler
from fewstep.zoo.tiny import build_tiny_sd3_pipeline, build_tiny_sd_pipeline, load_tiny_pipeline

SCHEDULERS = [
    (DDIMSolverScheduler, {}),
    (DPMSolverPPScheduler, {"order": 2}),
    (DPMSolverPPScheduler, {"order": 3, "variant": "heun"}),
    (UniPCScheduler, {"order": 2}),
    (UniPCScheduler, {"order": 3, "variant": "bh1"}),
]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"), use_dynamic_shifting=True)


def _run(pipe, dtype=torch.float32, **kw):
    kw = {"prompt": ["a photo of a cat", "a dog"], "num_inference_steps": 5, "height": 32, "width": 32,
          "output_type": "pt", "generator": torch.Generator().manual_seed(0), **kw}
    return pipe(**kw).images


@pytest.mark.parametrize("cls,options", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sd_pipeline_swap_with_cfg(sd, cls, options, dtype):
    pipe = sd.to(dtype=dtype)
    original = pipe.scheduler
    try:
        pipe.scheduler = cls.from_config(original.config, **options)
        assert pipe.scheduler.solver.config == {**pipe.scheduler.solver.config, **options}
        images = _run(pipe, guidance_scale=7.5)
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images.float()).all()
        # CFG matters: guidance 1 gives a different picture.
        assert not torch.allclose(images.float(), _run(pipe, guidance_scale=1.0).float())
    finally:
        pipe.scheduler = original
        pipe.to(dtype=torch.float32)


def test_pipeline_with_fewstep_scheduler_saves_and_loads(sd, tmp_path):
    pipe = sd
    original = pipe.scheduler
    try:
        pipe.scheduler = UniPCScheduler.from_config(original.config, order=3)
        pipe.save_pretrained(tmp_path)
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["scheduler"][1] == "UniPCScheduler" and index["scheduler"][0].startswith("fewstep")
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
        assert type(loaded.scheduler) is UniPCScheduler and loaded.scheduler.solver.config["order"] == 3
        torch.testing.assert_close(_run(loaded, guidance_scale=3.0), _run(pipe, guidance_scale=3.0))
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("cls,options", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_flow_pipeline_takes_sigmas_and_mu(sd3, cls, options):
    pipe = sd3
    original = pipe.scheduler
    try:
        pipe.scheduler = cls.from_config(original.config, **options)
        assert pipe.scheduler.config.prediction_type == "flow_prediction"
        assert pipe.scheduler.config.use_dynamic_shifting
        calls = []
        set_timesteps = pipe.scheduler.set_timesteps

        @functools.wraps(set_timesteps)  # keeps the signature retrieve_timesteps inspects
        def spy(*args, **kwargs):
            calls.append(kwargs)
            return set_timesteps(*args, **kwargs)

        pipe.scheduler.set_timesteps = spy
        sigmas = [1.0, 0.8, 0.6, 0.4, 0.2]
        images = _run(pipe, sigmas=sigmas, guidance_scale=4.0)  # retrieve_timesteps passes sigmas and mu
        assert torch.isfinite(images).all()
        assert calls[0]["sigmas"] == sigmas and calls[0]["mu"] is not None
        original.set_timesteps(sigmas=sigmas, mu=calls[0]["mu"])
        torch.testing.assert_close(pipe.scheduler.sigmas, original.sigmas)  # same shifted grid as FlowMatchEuler
        assert pipe.scheduler.timesteps.dtype == torch.float32  # flow timesteps stay fractional
        assert float(pipe.scheduler.sigmas[-1]) == 0.0
    finally:
        pipe.scheduler = original


def test_flow_ddim_reproduces_the_pipelines_own_euler(sd3):
    pipe = sd3
    reference = _run(pipe, guidance_scale=4.0)
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMSolverScheduler.from_config(original.config)
        torch.testing.assert_close(_run(pipe, guidance_scale=4.0), reference, rtol=1e-4, atol=1e-4)
    finally:
        pipe.scheduler = original


def test_sd3_reloads_with_fewstep_scheduler(sd3, tmp_path):
    original = sd3.scheduler
    try:
        sd3.scheduler = FewstepScheduler.from_config(original.config, solver="dpmpp", order=3)
        sd3.save_pretrained(tmp_path)
        loaded = load_tiny_pipeline(tmp_path)
        assert type(loaded.scheduler) is FewstepScheduler and loaded.scheduler.solver.name == "dpmpp"
    finally:
        sd3.scheduler = original


def test_unconditional_ddim_pipeline_with_fewstep_schedulers():
    # DDIMPipeline passes eta, use_clipped_model_output and generator to step().
    from diffusers import DDIMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, layers_per_block=1)
    for cls in (DDIMSolverScheduler, UniPCScheduler):
        pipe = DDIMPipeline(unet=unet, scheduler=cls.from_config({"clip_sample": True}))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=4, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
