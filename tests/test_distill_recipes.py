"""AGD recipes end to end: every shipped configs/distill/*.yaml, scaled down by key=value overrides, on its
tiny pipeline: trains, validates, checkpoints, resumes, exports, and the adapters run in a fresh stock
pipeline with one denoiser call per step (counted)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.config import load_config
from fewstep.distill import disable_guidance_adapters, enable_guidance_adapters
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import latest_checkpoint, train
from fewstep.zoo import tiny

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("digits", "sd15", "sdxl", "sd3", "dit")
BUILDERS = {"sd15": tiny.build_tiny_sd_pipeline, "sdxl": tiny.build_tiny_sdxl_pipeline,
            "sd3": tiny.build_tiny_sd3_pipeline, "dit": tiny.build_tiny_dit_pipeline}
# The recipe's own settings, scaled down; everything else (scheduler, w range, validation prompts,
# guidance scales, placement) is the recipe's. learning_rate: big enough that 3 steps move the output.
SCALE = ["num_shards=2", "shard_size=2", "trajectory_steps=2", "batch_size=2", "gradient_accumulation_steps=1",
         "warmup_steps=1", "learning_rate=1e-2", "checkpointing_steps=1", "validation_steps=2",
         "validation_num_inference_steps=2", "report_to=none", "progress=false", "cpu=true", "mixed_precision=no",
         "head_dim=8", "logging_steps=1"]


def _recipe_overrides(recipe, folder):
    """Overrides that point a recipe at its tiny pipeline (built into ``folder`` once)."""
    if recipe == "digits":
        return []
    if not (folder / "pipe" / "model_index.json").is_file():
        BUILDERS[recipe](folder / "pipe")
    out = [f"model={folder / 'pipe'}"]
    if recipe in ("sd15", "sdxl", "sd3"):
        (folder / "prompts.txt").write_text("a red cube\na blue ball on grass\n")
        out.append(f"prompts_file={folder / 'prompts.txt'}")
    return out


def _config(recipe, folder, *extra):
    return load_config(DistillConfig, ROOT / f"configs/distill/{recipe}.yaml",
                       overrides=[*SCALE, *_recipe_overrides(recipe, folder), f"trajectory_dir={folder / 'traj'}",
                                  *extra])


def _stock_pipeline(recipe, folder):
    if recipe == "digits":
        from fewstep.zoo.digits import load_digits_pipeline

        pipe = load_digits_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return tiny.load_tiny_pipeline(folder / "pipe")


def _sample(recipe, pipe, w):
    g = torch.Generator().manual_seed(0)
    if recipe in ("digits", "dit"):
        return pipe([1, 7], guidance_scale=w, num_inference_steps=3, generator=g, output_type="pt" if recipe ==
                    "digits" else "np").images
    return pipe(["a red cube", "a green cone"], guidance_scale=w, num_inference_steps=3, height=32, width=32,
                output_type="pt", generator=g).images


def check_one_forward_per_step(recipe, folder, adapters_dir, w=4.0):
    """Loads the adapters into a fresh stock pipeline; counts the denoiser's calls and rows per call."""
    pipe = _stock_pipeline(recipe, folder)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    rows = []
    handle = denoiser.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        cfg = torch.as_tensor(_sample(recipe, pipe, w))
        cfg_rows, rows[:] = list(rows), []
        enable_guidance_adapters(pipe, adapters_dir)
        guided = torch.as_tensor(_sample(recipe, pipe, w))
    finally:
        handle.remove()
        disable_guidance_adapters(pipe, remove=True)
    # Real CFG: one call per step on the doubled batch (2 x 2 samples); adapters: as many calls, 2 rows each.
    assert cfg_rows and set(cfg_rows) == {4} and rows == [2] * len(cfg_rows), (cfg_rows, rows)
    assert torch.isfinite(guided).all() and not torch.equal(guided, cfg)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("recipe", ["sd15", "dit"])
def test_recipe_trains_validates_resumes_and_exports(recipe, tmp_path):
    """One process, in-process: killed after step 2 and resumed, it ends with the adapters of a straight run."""
    straight = train(_config(recipe, tmp_path, f"output_dir={tmp_path / 'straight'}", "max_steps=3"))

    def crash(step):
        if step == 2:
            raise _Killed

    with pytest.raises(_Killed):
        train(_config(recipe, tmp_path, f"output_dir={tmp_path / 'run'}", "max_steps=3"), step_callback=crash)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    assert (tmp_path / "run" / "validation" / "step-000002.safetensors").is_file()
    resumed = train(_config(recipe, tmp_path, f"output_dir={tmp_path / 'run'}", "max_steps=3",
                            "resume_from_checkpoint=latest"))
    from safetensors.torch import load_file

    a, b = load_file(straight / "adapters.safetensors"), load_file(resumed / "adapters.safetensors")
    # Same process, same batches, same kernels: bitwise.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_one_forward_per_step(recipe, tmp_path, resumed)


def _torchrun(command_args, port):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "fewstep", "distill", "train", *command_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_two_processes_train_validate_checkpoint_resume_export(recipe, tmp_path):
    """2 CPU processes (torchrun + cpu=true; `accelerate launch --cpu --num_processes 2` runs one process)."""
    port = 29600 + RECIPES.index(recipe)
    args = ["--config", str(ROOT / f"configs/distill/{recipe}.yaml"), *SCALE, *_recipe_overrides(recipe, tmp_path),
            f"output_dir={tmp_path / 'run'}"]
    _torchrun([*args, "max_steps=3"], port)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert (tmp_path / "run" / "validation" / "step-000002.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "trajectories").glob("shard-*")) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]  # one per rank
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "run" / "adapters" / "adapters.safetensors")
    # A crash after step 2: the last checkpoint is gone; the same settings resume from step 2.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-3")
    log = _torchrun([*args, "max_steps=3", "resume_from_checkpoint=latest"], port)
    assert "resumed from" in log and "at step 2" in log
    resumed = load_file(tmp_path / "run" / "adapters" / "adapters.safetensors")
    # Same 2-process split, same batches, same kernels: the resumed run ends where the straight one did.
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    import json

    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["processes"] == 2
    assert (tmp_path / "run" / "validation" / "step-000003.safetensors").is_file()
    check_one_forward_per_step(recipe, tmp_path, tmp_path / "run" / "adapters")
