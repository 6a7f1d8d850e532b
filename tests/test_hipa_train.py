"""HiPA through the accelerate trainer (method: hipa): teacher triples in the trajectory store, kill-and-resume,
the diffusers LoRA export in a stock pipeline, the guidance-range option, recipes, config errors, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from fewstep.config import load_config  # noqa: E402
from fewstep import OneStepScheduler  # noqa: E402
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import latest_checkpoint, train
from fewstep.cli import main as fewstep_main  # noqa: E402
from fewstep.distill.trajectories import TrajectorySpec, load_trajectories  # noqa: E402
from fewstep.zoo import tiny  # noqa: E402


def main(argv):  # ``fewstep distill train ARGV``
    return fewstep_main(["distill", "train", *argv])

ROOT = Path(__file__).resolve().parent.parent
TINY = ["num_shards=2", "shard_size=4", "trajectory_steps=3", "batch_size=4", "report_to=none", "progress=false",
        "warmup_steps=1", "learning_rate=1e-2", "logging_steps=1", "cpu=true"]
PROMPTS = ["a red cube", "a blue ball on grass"]


def _digits(tmp_path, name, *extra):
    return load_config(DistillConfig, ROOT / "configs/distill/hipa_digits.yaml",
                       overrides=[*TINY, f"output_dir={tmp_path / name}", f"trajectory_dir={tmp_path / 'traj'}",
                                  *extra])


def _recipe(recipe, tmp_path, name, *extra):
    """A shipped recipe scaled down and pointed at its tiny pipeline (built into tmp_path once)."""
    if not (tmp_path / "pipe" / "model_index.json").is_file():
        build = {"hipa_sd15": tiny.build_tiny_sd_pipeline, "hipa_sdxl": tiny.build_tiny_sdxl_pipeline}[recipe]
        build(tmp_path / "pipe")
        (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return load_config(DistillConfig, ROOT / f"configs/distill/{recipe}.yaml",
                       overrides=[*TINY, "mixed_precision=no", "gradient_checkpointing=false",
                                  "gradient_accumulation_steps=1", "checkpointing_steps=0", "validation_steps=2",
                                  "validation_prompts=[a red cube,a green cone]", "max_steps=2", "head_dim=8",
                                  f"model={tmp_path / 'pipe'}", f"prompts_file={tmp_path / 'prompts.txt'}",
                                  f"output_dir={tmp_path / name}", f"trajectory_dir={tmp_path / name / 'traj'}",
                                  *extra])


def test_teacher_triples_are_the_solvers_samples_from_the_stored_noise(tmp_path):
    from fewstep.distill.trajectories import LabelTeacher
    from fewstep.samplers.scheduler import FewstepScheduler
    from fewstep.zoo.digits import NULL_LABEL, load_digits_pipeline

    cfg = _digits(tmp_path, "run", "num_shards=1", "trajectory_dtype=float16", "hipa.guidance=2.0")
    spec = cfg.trajectory_spec()
    assert spec.record == "final" and spec.rows_per_shard == 4 and (spec.w_min, spec.w_max) == (2.0, 2.0)
    assert "record" not in TrajectorySpec(1, 1, 1).identity()  # AGD manifests (and collections) are unchanged
    from fewstep.distill.trajectories import collect_trajectories

    pipe = load_digits_pipeline()
    scheduler = FewstepScheduler.from_config(pipe.scheduler.config, solver="unipc")
    folder = collect_trajectories(LabelTeacher(pipe.unet, 10, NULL_LABEL), scheduler, spec, tmp_path / "traj",
                                  process_index=0, num_processes=1, progress=False)
    records, manifest = load_trajectories(folder)
    assert manifest["spec"]["record"] == "final" and records["x"].shape == (4, 1, 8, 8)
    assert (records["w"] == 2.0).all()
    # Half-precision storage: the teacher started from exactly the stored (rounded) noise.
    raw = load_file(folder / "shard-00000.safetensors")
    assert raw["x"].dtype == torch.float16
    # The stored sample is the stock pipeline's (its output is clamped; CFG batch order differs: rounding).
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    images = pipe(records["cond"], guidance_scale=2.0, num_inference_steps=3, latents=records["x"],
                  output_type="pt").images
    torch.testing.assert_close(records["target"].clamp(-1, 1), images, atol=2e-3, rtol=0)


class _Killed(Exception):
    pass


def test_kill_and_resume_reaches_the_same_lora(tmp_path):
    extra = ["max_steps=4", "checkpointing_steps=2", "gradient_accumulation_steps=2", "validation_steps=0"]
    straight = train(_digits(tmp_path, "straight", *extra[:-1], "validation_steps=4"))
    assert straight == tmp_path / "straight" / "lora"

    def crash(step):
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train(_digits(tmp_path, "resumed", *extra), step_callback=crash)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-2"
    # Checkpoints hold the trainable weights only, not the frozen base.
    saved = load_file(tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    resumed = train(_digits(tmp_path, "resumed", *extra, "resume_from_checkpoint=latest"))
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    # Same process, same batches, same kernels: bitwise.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_B" in k or "lora.up" in k for k in a)
    assert all(a[k].abs().sum() > 0 for k in a)  # B moved off zero: it trained
    assert json.loads((tmp_path / "resumed" / "checkpoints" / "checkpoint-4" / "fewstep_state.json").read_text())[
        "run"]["hipa"]["rank"] == 4  # the HiPA settings are part of the run's identity (AGD's identity has none)
    agd = load_config(DistillConfig, ROOT / "configs/distill/digits.yaml")
    assert "hipa" not in agd.run_identity(1) and "method" not in agd.run_identity(1)
    summary = json.loads((tmp_path / "resumed" / "train_summary.json").read_text())
    assert summary["lora_parameters"] > 0 and summary["adapter_parameters"] == 0

    # The digits UNet2DModel has no diffusers LoRA loader: load_hipa_lora reads the export; one step from the
    # validation noise gives the trainer's validation samples (same layers, kernels and batch: bitwise).
    from fewstep.distill.hipa import one_step_sample
    from fewstep.distill.hipa_train import load_hipa_lora
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    load_hipa_lora(pipe.unet, straight)
    noise = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sample = one_step_sample(pipe.unet, OneStepScheduler.from_config(pipe.scheduler.config), noise,
                                 class_labels=torch.arange(10))
    validation = load_file(tmp_path / "straight" / "validation" / "step-000004.safetensors")
    assert validation.keys() == {"w1.5"} and torch.equal(sample, validation["w1.5"])
    with pytest.raises(ValueError, match="already has an adapter"):
        load_hipa_lora(pipe.unet, straight)


def _prompt_embeds(pipe, texts):
    """The embeddings the trainer's PromptTeacher computed: training + validation prompts and "" in one batch."""
    all_texts = [*PROMPTS, *[t for t in texts if t not in PROMPTS]]
    with torch.no_grad():
        table, _ = pipe.encode_prompt([*all_texts, ""], "cpu", 1, False)
    return table[[all_texts.index(t) for t in texts]], table[-1:].expand(len(texts), -1, -1)


@pytest.mark.parametrize("guidance_range", [None, [1.5, 5.0]])
def test_sd15_recipe_export_reproduces_the_student_in_a_stock_pipeline(tmp_path, guidance_range):
    """The exported LoRA (and, with a guidance range, the adapters) in a stock one-step pipeline call gives the
    student's validation samples; with a range, the student's sample depends on w."""
    from fewstep.distill import disable_guidance_adapters, enable_guidance_adapters

    extra = [] if guidance_range is None else [f"hipa.guidance_range={guidance_range}", "validation_guidance=[2,4]"]
    cfg = _recipe("hipa_sd15", tmp_path, "run", *extra)
    folder = train(cfg)
    samples = load_file(tmp_path / "run" / "validation" / "step-000002.safetensors")
    pipe = tiny.load_tiny_pipeline(tmp_path / "pipe")
    pipe.scheduler = OneStepScheduler.from_config(pipe.scheduler.config)
    texts = list(cfg.validation_prompts)
    embeds, negative = _prompt_embeds(pipe, texts)
    noise = torch.randn(len(texts), 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def one_step(w, negative=negative):
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1, guidance_scale=w,
                    latents=noise, height=64, width=64, output_type="latent").images

    base = one_step(1.0)
    pipe.load_lora_weights(folder)
    if guidance_range is None:
        assert samples.keys() == {"w7.5"}
        out = one_step(1.0)  # one forward, no CFG
        # Same peft layers, kernels and batch as the student's validation call: bitwise.
        assert torch.equal(out, samples["w7.5"]) and not torch.equal(out, base)
    else:
        enable_guidance_adapters(pipe, tmp_path / "run" / "adapters")
        try:
            outs = {w: one_step(w, None) for w in (2.0, 4.0)}  # the adapters take w: one forward per step
        finally:
            disable_guidance_adapters(pipe, remove=True)
        # The pipeline hands the adapters one scalar w, the trainer one w per row: the guidance embedding
        # runs on another batch shape (kernel rounding), the rest is the same computation.
        for w in (2, 4):
            torch.testing.assert_close(outs[float(w)], samples[f"w{w}"], rtol=1e-5, atol=1e-4)
        assert not torch.equal(outs[2.0], outs[4.0])  # the student is conditioned on w
        summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
        assert summary["adapter_parameters"] > 0
    pipe.unload_lora_weights()
    assert torch.equal(one_step(1.0), base)


def test_config_errors_are_one_line_naming_the_key(capsys):
    digits = str(ROOT / "configs/distill/hipa_digits.yaml")
    cases = [
        (["hipa.rank=0"], "hipa.rank must be a positive whole number"),
        (["hipa.bogus=1"], "hipa.bogus"),
        (["hipa.edge_operator=canny"], "hipa.edge_operator must be one of"),
        (["hipa.guidance=0.5"], "hipa.guidance (the teacher's CFG scale) must be finite and >= 1"),
        (["hipa.guidance_range=[4,2]"], "hipa.guidance_range must be [lo, hi]"),
        (["hipa.cutoff=x"], "hipa.cutoff"),
        (["method=lora"], "method must be one of ['agd', 'hipa']"),
        (["mode=full"], "method=hipa trains LoRA adapters on the frozen base: mode must be 'adapters'"),
        (["data=noised"], "data must be 'trajectories'"),
    ]
    for overrides, message in cases:
        assert main(["--config", digits, *overrides]) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith("fewstep distill train: error:") and message in err, (overrides, err)
        assert err.count("\n") == 1, err
    assert main(["--config", str(ROOT / "configs/distill/hipa_sd15.yaml"), "hipa.feature_weight=0.1"]) == 2
    assert "only model=digits ships one" in capsys.readouterr().err
    from fewstep.cli import main as cli_main

    assert cli_main(["distill", "estimate", "--config", digits]) == 2  # the estimate models AGD only
    assert "method=hipa is not estimated" in capsys.readouterr().err


def test_mixed_precision_trains_float32_lora_on_a_bf16_base(tmp_path):
    cfg = _digits(tmp_path, "bf16", "mixed_precision=bf16", "max_steps=2", "checkpointing_steps=2",
                  "validation_steps=0", "num_shards=1")
    assert cfg.base_dtype() == torch.bfloat16
    lora = load_file(train(cfg) / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    saved = load_file(tmp_path / "bf16" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in saved.values())


def test_student_model_check_names_the_problem():
    from fewstep.distill.hipa_train import check_student_model
    from fewstep.zoo.digits import load_digits_pipeline

    pipe = load_digits_pipeline()
    check_student_model(pipe.unet, pipe.scheduler.config)
    with pytest.raises(ValueError, match="supports UNet pipelines.*got a Linear"):
        check_student_model(torch.nn.Linear(2, 2), pipe.scheduler.config)
    with pytest.raises(ValueError, match="VP"):
        check_student_model(pipe.unet, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})


def test_done_message_names_the_loader_that_reads_the_export(tmp_path):
    from fewstep.distill.hipa_train import done_message

    digits, sd = _digits(tmp_path, "run"), load_config(DistillConfig, ROOT / "configs/distill/hipa_sd15.yaml")
    folder = tmp_path / "run" / "lora"
    # UNet2DModel has no diffusers LoRA loader: the digits line must not say pipe.load_lora_weights.
    assert f"load_hipa_lora(pipe.unet, '{folder}')" in done_message(folder, digits)
    assert "load_lora_weights" not in done_message(folder, digits) and "adapters" not in done_message(folder, digits)
    assert f"pipe.load_lora_weights('{folder}')" in done_message(folder, sd)
    ranged = load_config(DistillConfig, ROOT / "configs/distill/hipa_sd15.yaml",
                         overrides=["hipa.guidance_range=[2,8]"])
    assert f"enable_guidance_adapters(pipe, '{tmp_path / 'run' / 'adapters'}')" in done_message(folder, ranged)


@pytest.mark.parametrize("name", ["hipa_sd15", "hipa_sdxl"])
def test_gpu_recipes_parse_with_real_hub_ids(name):
    cfg = load_config(DistillConfig, ROOT / f"configs/distill/{name}.yaml")
    assert cfg.method == "hipa" and cfg.mixed_precision == "bf16" and cfg.validation_prompts
    assert cfg.model in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0")


@pytest.mark.slow
def test_sdxl_recipe_trains_and_exports_a_loadable_lora(tmp_path):
    folder = train(_recipe("hipa_sdxl", tmp_path, "run"))
    samples = load_file(tmp_path / "run" / "validation" / "step-000002.safetensors")
    pipe = tiny.load_tiny_pipeline(tmp_path / "pipe")
    pipe.scheduler = OneStepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, *samples["w6"].shape[1:], generator=torch.Generator().manual_seed(0))
    size = samples["w6"].shape[-1] * pipe.vae_scale_factor

    def one_step():
        return pipe(["a red cube", "a green cone"], num_inference_steps=1, guidance_scale=1.0, latents=noise,
                    height=size, width=size, output_type="latent").images

    base = one_step()
    pipe.load_lora_weights(folder)
    out = one_step()
    # The pipeline encodes the two prompts alone (the trainer: with the training prompts): text-encoder rounding.
    torch.testing.assert_close(out, samples["w6"], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, base)


@pytest.mark.slow
def test_two_process_torchrun_trains(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
               "-m", "fewstep", "distill", "train", "--config", str(ROOT / "configs/distill/hipa_digits.yaml"), *TINY,
               "batch_size=2", "max_steps=3", "checkpointing_steps=3", "validation_steps=3", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "trajectories").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]  # one per rank
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    # Same data (shards do not depend on the split), batch 2 x 2 = 4: one process with batch 4 agrees
    # up to the summation order of the gradient all-reduce.
    single = train(_digits(tmp_path, "single", "max_steps=3", "checkpointing_steps=0", "validation_steps=0",
                           f"trajectory_dir={out / 'trajectories'}"))
    reference = load_file(single / "pytorch_lora_weights.safetensors")
    assert weights.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
