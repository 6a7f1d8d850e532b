"""AGD options and checks: adapter placement, SDXL / learned-variance DiT teachers against their pipelines,
PEFT LoRA in either order, and the trainer's one-line refusals."""

import copy
import warnings
from pathlib import Path

import pytest
import torch

from fewstep.distill import (
    AdapterConfig, GuidanceAdapters, disable_guidance_adapters, enable_guidance_adapters, load_adapters,
    save_adapters,
)
from fewstep.distill.trajectories import (
    LabelTeacher, PromptTeacher, TrajectorySpec, build_scheduler, collect_trajectories, load_trajectories,
)
from fewstep.distill.settings import DistillConfig
from fewstep.cli import main as fewstep_main
from fewstep.zoo import tiny
from fewstep.zoo.digits import NULL_LABEL, load_digits_pipeline
from test_distill_adapters import _randomise  # trained-looking adapters


def main(argv):  # ``fewstep distill train ARGV``
    return fewstep_main(["distill", "train", *argv])

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny.build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return tiny.build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit"))


# ---------------------------------------------------------------------------------------- placement
def test_attention_plus_resnet_placement(tmp_path):
    unet = load_digits_pipeline().unet
    g = torch.Generator().manual_seed(0)
    args, kwargs = (torch.randn(3, 1, 8, 8, generator=g), torch.tensor([900, 400, 20])), {
        "class_labels": torch.tensor([3, 7, NULL_LABEL])}
    with torch.no_grad():
        unet.requires_grad_(False)  # the reference runs with the base frozen as the adapters freeze it (same kernel)
        reference = unet(*args, **kwargs).sample
        unet.requires_grad_(True)
    attention_only = GuidanceAdapters(copy.deepcopy(unet), AdapterConfig(width_ratio=0.5, head_dim=16))
    config = AdapterConfig(width_ratio=0.25, head_dim=16, placement="attention+resnet")
    adapters = GuidanceAdapters(unet, config)
    try:
        names = [p.name for p in adapters.architecture.points]
        assert sum(n.endswith(".conv2") for n in names) == 11 and sum(".attentions." in n for n in names) == 4
        # Fewer parameters than the digits recipe's attention-only adapters (width 0.5): 51,040 vs 58,144.
        assert adapters.num_parameters() < attention_only.num_parameters()
        with torch.no_grad():
            assert torch.equal(adapters(*args, guidance_scale=3.0, **kwargs).sample, reference)
            guided = _randomise(adapters)(*args, guidance_scale=3.0, **kwargs).sample
            assert (guided - reference).abs().max() > 1e-3
            # Every ResNet adapter acts on the output.
            block = adapters.blocks[names.index("mid_block.resnets.1.conv2")]
            saved = block.to_out.weight.clone()
            block.to_out.weight.zero_()
            assert not torch.equal(adapters(*args, guidance_scale=3.0, **kwargs).sample, guided)
            block.to_out.weight.copy_(saved)
        save_adapters(adapters, tmp_path)
    finally:
        adapters.remove()
    loaded = load_adapters(unet, tmp_path)
    try:
        assert loaded.config.placement == "attention+resnet"
        with torch.no_grad():
            assert torch.equal(loaded(*args, guidance_scale=3.0, **kwargs).sample, guided)
    finally:
        loaded.remove()
    with pytest.raises(ValueError, match="placement must be one of"):
        AdapterConfig(placement="resnet")
    with torch.random.fork_rng(devices=[]):
        from diffusers import DiTTransformer2DModel

        transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="'attention\\+resnet' needs ResNet blocks, which a DiTTransformer2DModel"):
        GuidanceAdapters(transformer, AdapterConfig(placement="attention+resnet"))


# ----------------------------------------------------------- teachers follow their pipelines' own CFG
def _pipeline_inputs(denoiser):
    """Records the conditional half of every denoiser call (inputs of the pipeline's CFG)."""
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x)

    return seen, denoiser.register_forward_pre_hook(hook, with_kwargs=True)


def _collect(teacher, scheduler, spec, folder):
    collect_trajectories(teacher, scheduler, spec, folder, process_index=0, num_processes=1, progress=False)
    return load_trajectories(folder)[0]


def test_sdxl_teacher_reproduces_the_pipelines_cfg_trajectory(sdxl, tmp_path):
    teacher = PromptTeacher(sdxl, ["a red cube", "a blue ball"], validation_prompts=["a green cone"])
    spec = TrajectorySpec(num_shards=1, shard_size=2, num_inference_steps=3, w_min=4.0, w_max=4.0, seed=7,
                          dtype="float32")  # the states as computed, not rounded to float16 storage
    records = _collect(teacher, build_scheduler("EulerDiscreteScheduler", sdxl.scheduler.config), spec, tmp_path)
    # The shard's draws, replayed: conditions, w, then the unit noise the pipeline gets as latents.
    g = torch.Generator().manual_seed(7)
    cond, _ = torch.randint(2, (2,), generator=g), torch.rand(2, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    seen, handle = _pipeline_inputs(sdxl.unet)
    try:
        sdxl([teacher.prompts[i] for i in cond], guidance_scale=4.0, num_inference_steps=3, latents=noise.clone(),
             output_type="latent")
    finally:
        handle.remove()
    # The pipeline stacks [negative, positive]; its positive rows are the recorded states at every step, so
    # prompts, zeroed empty negative prompt, pooled embeddings, time ids and the CFG combine all agree.
    # Tolerance: the teacher's doubled batch is [conditional, null], the pipeline's the reverse (other rows, other
    # kernel blocking), and the error of a step feeds the next.
    recorded = records["x"].view(3, 2, 4, 8, 8)
    for step, x in enumerate(seen):
        torch.testing.assert_close(x[2:], recorded[step], rtol=1e-4, atol=1e-5)
    assert torch.equal(records["cond"][:2], cond)
    # Validation prompts are encoded too, without becoming training conditions.
    assert teacher.num_conditions == 2 and teacher.index_of("a green cone") == 2


def test_learned_variance_dit_teacher_reproduces_the_dit_pipeline(dit, tmp_path):
    transformer = dit.transformer
    assert transformer.config.out_channels == 2 * transformer.config.in_channels
    teacher = LabelTeacher(transformer, 1000, 1000)
    spec = TrajectorySpec(num_shards=1, shard_size=2, num_inference_steps=3, w_min=3.0, w_max=3.0, seed=5,
                          dtype="float32")  # the states as computed, not rounded to float16 storage
    records = _collect(teacher, build_scheduler("DDIMScheduler", dit.scheduler.config), spec, tmp_path)
    assert records["target"].shape[1:] == (4, 8, 8)  # the noise half only, as the pipeline guides and samples
    g = torch.Generator().manual_seed(5)
    cond, _ = torch.randint(1000, (2,), generator=g), torch.rand(2, generator=g)
    seen, handle = _pipeline_inputs(transformer)
    try:
        dit(cond.tolist(), guidance_scale=3.0, num_inference_steps=3, generator=g, output_type="np")
    finally:
        handle.remove()
    recorded = records["x"].view(3, 2, 4, 8, 8)
    for step, x in enumerate(seen):  # DiTPipeline stacks [conditional, null]; tolerance as for SDXL above
        torch.testing.assert_close(x[:2], recorded[step], rtol=1e-4, atol=1e-5)


def test_dit_pipeline_runs_adapters_with_one_forward_per_step(dit, tmp_path):
    labels = [3, 999]
    adapters = GuidanceAdapters(dit.transformer)
    save_adapters(adapters, tmp_path / "zero")
    save_adapters(_randomise(adapters), tmp_path / "trained")
    adapters.remove()

    def run(w):
        return torch.as_tensor(dit(labels, guidance_scale=w, num_inference_steps=3, output_type="np",
                                   generator=torch.Generator().manual_seed(0)).images)

    cfg = run(4.0)
    rows = []
    handle = dit.transformer.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        enable_guidance_adapters(dit, tmp_path / "zero")
        conditional = run(1.0)  # w = 1: no doubled batch, the adapters get w = 1
        rows.clear()
        assert torch.equal(run(4.0), conditional)  # untrained: the conditional model, one half-batch call per step
        assert rows == [2, 2, 2]
        enable_guidance_adapters(dit, tmp_path / "trained")
        guided = run(4.0)
        assert not torch.equal(guided, conditional) and not torch.equal(guided, run(2.0))  # w reaches the adapters
        disable_guidance_adapters(dit)
        assert torch.equal(run(4.0), cfg)
    finally:
        handle.remove()
        disable_guidance_adapters(dit, remove=True)
    assert type(dit).__name__ == "DiTPipeline" and "_fewstep_recorded" not in type(dit).__dict__


def test_sdxl_adapters_see_the_pooled_embedding_and_run_one_forward_per_step(sdxl, tmp_path):
    adapters = _randomise(GuidanceAdapters(sdxl.unet))
    assert [s.name for s in adapters.tokens.sources] == ["timestep", "pooled_prompt", "prompt"]
    assert adapters.tokens.sources[1].module == "add_embedding"
    save_adapters(adapters, tmp_path)
    adapters.remove()
    rows = []
    handle = sdxl.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    kw = dict(prompt=["a red cube", "a cat"], num_inference_steps=3, height=32, width=32, output_type="pt")
    try:
        cfg = sdxl(**kw, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
        enable_guidance_adapters(sdxl, tmp_path)
        rows.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            guided = sdxl(**kw, guidance_scale=5.0, negative_prompt=["dark", "blurry"],
                          generator=torch.Generator().manual_seed(0)).images
            sdxl(**kw, guidance_scale=5.0, negative_prompt=["dark", "blurry"])
        assert sum("negative_prompt is ignored" in str(w.message) for w in caught) == 1  # once
        assert rows[:3] == [2, 2, 2] and torch.isfinite(guided).all() and not torch.equal(guided, cfg)
    finally:
        handle.remove()
        disable_guidance_adapters(sdxl, remove=True)


# ---------------------------------------------------------------------------------------- PEFT LoRA
def test_adapters_and_an_unfused_peft_lora_combine_in_either_order(tmp_path):
    peft = pytest.importorskip("peft")
    sd = tiny.build_tiny_sd_pipeline()
    save_adapters(_randomise(GuidanceAdapters(sd.unet)), tmp_path)
    GuidanceAdapters.attached_to(sd.unet).remove()
    lora = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                           init_lora_weights="gaussian")

    def add_lora(pipe):
        pipe.unet.add_adapter(lora, adapter_name="style")
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if "lora_" in name:  # a trained LoRA (B starts at zero), the same in both pipelines
                    param.copy_(torch.randn(param.shape, generator=g) * 0.05)

    def run(pipe):
        return pipe(prompt=["a red cube"], guidance_scale=5.0, num_inference_steps=3, height=32, width=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    first, second = copy.deepcopy(sd), copy.deepcopy(sd)
    add_lora(first)
    enable_guidance_adapters(first, tmp_path)  # LoRA first, then the adapters (refused before)
    enable_guidance_adapters(second, tmp_path)  # adapters first, then LoRA
    add_lora(second)
    a, b = run(first), run(second)
    # Same computation; tolerance because the LoRA weights are frozen in one order only (requires_grad picks
    # the CPU Linear kernel, ~1e-6).
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    disable_guidance_adapters(first)
    assert not torch.allclose(run(first), a, atol=1e-4)  # the adapters act on the LoRA'd model
    disable_guidance_adapters(first, remove=True)
    disable_guidance_adapters(second, remove=True)


# ------------------------------------------------------------------------------ trainer refusals
DIGITS = ["--config", str(ROOT / "configs/distill/digits.yaml"), "num_shards=1", "shard_size=2", "trajectory_steps=2",
          "batch_size=2", "max_steps=1", "checkpointing_steps=0", "report_to=none", "progress=false",
          "validation_steps=1"]


@pytest.mark.parametrize("setting, message", [
    ("teacher_scheduler=FlowMatchEulerDiscreteScheduler", "is a flow-matching scheduler but the model's scheduler "
                                                          "config is VP"),
    ("teacher_scheduler=fewstep:unipc:order=9", "order=9 of solver 'unipc' is out of range"),
    ("validation_prompts=[99]", "class labels 0 to 9, got '99'"),
    ("validation_prompts=[abc]", "class labels 0 to 9, got 'abc'"),
    ("prompts=[a cat]", "prompts/prompts_file are for text pipelines; model=digits"),
    ("prompts_file=prompts.txt", "prompts/prompts_file are for text pipelines; model=digits"),
])
def test_trainer_refuses_bad_settings_before_any_work(setting, message, capsys, tmp_path):
    assert main([*DIGITS, f"output_dir={tmp_path}", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep distill train: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "trajectories").exists()


def test_text_recipe_without_validation_prompts_is_refused_before_training(capsys, tmp_path):
    tiny.build_tiny_sd_pipeline(tmp_path / "sd")
    base = ["--config", str(ROOT / "configs/distill/sd15.yaml"), f"model={tmp_path / 'sd'}", "cpu=true",
            "mixed_precision=no", "report_to=none", f"output_dir={tmp_path / 'run'}", "validation_prompts=[]",
            "prompts=[a cat]", "prompts_file=null"]
    assert main(base) == 2
    assert "validation_steps=500 samples validation_prompts, but none are given" in capsys.readouterr().err
    assert main([*base, f"prompts_file={tmp_path / 'missing.txt'}"]) == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "trajectories").exists()


def test_mixed_precision_no_is_accepted_unquoted():
    from fewstep.config import load_config

    # YAML 1.1 reads a bare `no` as the boolean false (command line and file alike).
    assert load_config(DistillConfig, overrides=["mixed_precision=no"]).mixed_precision == "no"
    assert load_config(DistillConfig, ROOT / "configs/distill/sd15.yaml",
                       overrides=["mixed_precision=no"]).mixed_precision == "no"
