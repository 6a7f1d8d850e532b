"""AGD memory (issue 17 item 4): activation counter, gradient checkpointing, half-precision base, estimate, host RAM."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fewstep.config import load_config
from fewstep.distill import GuidanceAdapters
from fewstep.distill.estimate import count_saved_activations, estimate
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import _prepare_base

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    return build_tiny_sd_pipeline(folder), folder


def _inputs(device="cpu", batch=1, generator=None):
    g = generator or torch.Generator().manual_seed(0)
    x, ehs = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)
    return x.to(device), torch.full((batch,), 500.0, device=device), ehs.to(device)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_counter_on_meta_equals_a_real_forward(tiny_sd, checkpointing):
    from diffusers import UNet2DConditionModel

    pipe, _ = tiny_sd
    counts = []
    for device in ("cpu", "meta"):
        with torch.device(device):
            unet = UNet2DConditionModel(**pipe.unet.config)
        adapters = GuidanceAdapters(unet)
        x, t, ehs = _inputs(device)
        counts.append(count_saved_activations(
            unet, lambda: adapters(x, t, encoder_hidden_states=ehs, guidance_scale=3.0), checkpointing))
        adapters.remove()
    assert counts[0] == counts[1] > 0  # the estimate's meta count is what a real forward saves


def test_gradient_checkpointing_switch_gives_the_same_adapter_gradients(tiny_sd):
    pipe, _ = tiny_sd
    grads, calls = [], []
    for flag in ("false", "true"):
        unet = type(pipe.unet)(**pipe.unet.config)
        unet.load_state_dict(pipe.unet.state_dict())
        _prepare_base(unet, load_config(DistillConfig, overrides=[f"gradient_checkpointing={flag}"]))
        adapters = GuidanceAdapters(unet)
        with torch.no_grad():
            for p in adapters.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        n = [0]
        unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(lambda m, a: n.__setitem__(0, n[0] + 1))
        x, t, ehs = _inputs(batch=2)
        F.mse_loss(adapters(x, t, encoder_hidden_states=ehs, guidance_scale=torch.tensor([2.0, 6.0])).sample,
                   torch.zeros_like(x)).backward()
        grads.append({k: p.grad for k, p in adapters.named_parameters()})
        calls.append(n[0])
    assert calls == [1, 2]  # checkpointed: the block (downstream of the adapters) ran again in backward
    for k in grads[0]:  # the recomputation repeats the same kernels on the same inputs: equal up to rounding order
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_half_precision_base_keeps_no_autocast_weight_copies(tiny_sd):
    """bf16 autocast on a float32 base casts every weight at each use and saves the casts for backward
    (the adapters upstream need input gradients): the trainer's default torch_dtype=auto stores the
    frozen base in bf16 instead, so no copies exist."""
    pipe, _ = tiny_sd
    copies = {}
    for dtype in ("float32", "auto"):
        unet = type(pipe.unet)(**pipe.unet.config)
        cfg = load_config(DistillConfig, overrides=["mixed_precision=bf16", f"torch_dtype={dtype}"])
        _prepare_base(unet, cfg)
        adapters = GuidanceAdapters(unet)
        weights = {}  # shape -> the base's matrices/kernels as bf16 (what an autocast copy holds)
        for p in unet.parameters():
            if p.ndim >= 2:
                weights.setdefault(tuple(p.shape), []).append(p.detach().to(torch.bfloat16))
        params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
        saved = {}

        def pack(t):
            if t.dtype == torch.bfloat16 and t.untyped_storage().data_ptr() not in params and \
                    any(torch.equal(t, w) for w in weights.get(tuple(t.shape), ())):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x, t, ehs = _inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            adapters(x.to(cfg.base_dtype()), t, encoder_hidden_states=ehs.to(cfg.base_dtype()), guidance_scale=3.0)
        copies[dtype] = sum(saved.values())
        adapters.remove()
    assert next(iter(pipe.unet.parameters())).dtype == torch.float32
    assert copies["float32"] > 0 and copies["auto"] == 0, copies


def test_estimate_cli_and_recipes_fit_24gb(tiny_sd, capsys):
    from fewstep.cli import main

    sd15 = str(ROOT / "configs/distill/sd15.yaml")
    assert main(["distill", "estimate", "--config", sd15, "prompts=[a cat]", "prompts_file=null"]) == 0
    text = capsys.readouterr().out
    for line in ("trajectories on disk:", "host RAM per process:", "GPU memory per process:", "activations (16 x",
                 "AdamW state:", "fits a 24 GB GPU", "note: activations: tensors saved for backward"):
        assert line in text, line
    assert estimate(load_config(DistillConfig, sd15, overrides=["prompts=[a]", "prompts_file=null"])).fits()
    # A local pipeline folder: read from its configs (text encoder counted), no weights loaded.
    _, folder = tiny_sd
    est = estimate(load_config(DistillConfig, overrides=[f"model={folder}", "prompts=[a,b]"]))
    assert est.host["prompt-embedding table"] == 3 * 77 * 32 * 4 and est.host["pipeline as loaded"] > 0
    assert main(["distill", "estimate", "model=stabilityai/unknown-model", "prompts=[a]"]) == 2
    assert "cannot estimate model" in capsys.readouterr().err


@pytest.mark.slow
def test_sdxl_recipe_fits_24gb_by_the_estimate():
    """The SDXL recipe (its own file where present, else the SD-1.5 recipe's settings on the SDXL UNet)."""
    sdxl, sd15 = ROOT / "configs/distill/sdxl.yaml", ROOT / "configs/distill/sd15.yaml"
    extra = [] if sdxl.is_file() else ["model=stabilityai/stable-diffusion-xl-base-1.0"]
    est = estimate(load_config(DistillConfig, sdxl if sdxl.is_file() else sd15,
                               overrides=["prompts=[a cat]", "prompts_file=null", *extra]))
    assert est.fits() and est.activations_per_sample > 0, est.to_dict()


@pytest.mark.slow
def test_peak_host_ram_does_not_grow_with_the_collection(tmp_path):
    """Digits training on 1x and 4x the collection (66 vs 264 MiB of float32 states; loading them would add
    over 30% to the process's own peak): the same peak RSS within 10%, since batches are read from the shards."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from distill_host_ram import main as bench
    finally:
        sys.path.pop(0)
    result = bench(["--work", str(tmp_path), "--out", str(tmp_path / "ram.json")])
    assert result["collection_growth_over_1x_peak"] > 0.2  # the measurement could see a loaded collection
    assert abs(result["peak_ratio_4x_over_1x"] - 1) <= 0.10, result


def test_prompts_are_encoded_in_chunks_with_the_same_embeddings(tiny_sd):
    from fewstep.distill.train import _encode_in_chunks

    pipe, _ = tiny_sd
    texts = [f"prompt number {i}" for i in range(5)]
    sizes = []

    def encode(*args, **kwargs):
        sizes.append(len(args[0]))
        return pipe.encode_prompt(*args, **kwargs)

    whole, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    chunked, none = _encode_in_chunks(encode, size=2)(texts, "cpu", 1, False)
    assert sizes == [2, 2, 1] and none is None
    # Per-prompt rows of a batched CLIP forward: same math, another batch size can change the kernel.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_half_precision_base_trains_validates_and_resumes(tmp_path):
    """mixed_precision=bf16 stores the frozen digits base in bf16 (torch_dtype=auto); validation sampling
    feeds it bf16 inputs, and a resumed run continues from the checkpoint."""
    from safetensors.torch import load_file

    from fewstep.distill.train import train

    def cfg(*extra):
        return load_config(DistillConfig, ROOT / "configs/distill/digits.yaml", overrides=[
            f"output_dir={tmp_path / 'run'}", "num_shards=1", "shard_size=4", "trajectory_steps=2", "batch_size=4",
            "width_ratio=0.25", "head_dim=16", "report_to=none", "progress=false", "warmup_steps=0",
            "mixed_precision=bf16", "gradient_checkpointing=true", "checkpointing_steps=1", "validation_steps=2",
            "validation_guidance=[3.0]", "validation_num_inference_steps=2", *extra])

    class Stop(Exception):
        pass

    def stop(step):
        if step == 1:
            raise Stop

    assert cfg().base_dtype() == torch.bfloat16
    with pytest.raises(Stop):
        train(cfg("max_steps=2"), step_callback=stop)
    out = train(cfg("max_steps=2", "resume_from_checkpoint=latest")).parent
    samples = load_file(out / "validation" / "step-000002.safetensors")["w3"]
    assert samples.dtype == torch.float32 and torch.isfinite(samples).all()


def test_estimate_runs_on_a_local_sdxl_pipeline_of_any_size(tmp_path):
    # The pooled width comes from the UNet's config (tiny: 32 + 6 time ids x 8), not SDXL-base's 1280.
    from fewstep.zoo.tiny import build_tiny_sdxl_pipeline

    build_tiny_sdxl_pipeline().save_pretrained(tmp_path / "sdxl")
    cfg = load_config(DistillConfig, ROOT / "configs/distill/sdxl.yaml",
                      overrides=[f"model={tmp_path / 'sdxl'}", "prompts=[a cat]", "prompts_file=null"])
    assert estimate(cfg).activations_per_sample > 0
