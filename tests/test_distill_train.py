"""AGD part 2: CFG trajectory collection and the accelerate trainer (tiny, CPU, deterministic)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.distill import disable_guidance_adapters, enable_guidance_adapters
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import latest_checkpoint, train
from fewstep.cli import main as fewstep_main
from fewstep.distill.trajectories import (
    LabelTeacher, TrajectorySpec, build_scheduler, collect_trajectories, load_trajectories,
)
from fewstep.zoo.digits import NULL_LABEL, load_digits_pipeline


def main(argv):  # ``fewstep distill train ARGV``
    return fewstep_main(["distill", "train", *argv])

ROOT = Path(__file__).resolve().parent.parent
TINY = ["num_shards=2", "shard_size=4", "trajectory_steps=3", "batch_size=8", "width_ratio=0.25", "head_dim=16",
        "report_to=none", "progress=false", "warmup_steps=2", "learning_rate=1e-2", "logging_steps=1"]


@pytest.fixture(scope="module")
def teacher():
    pipe = load_digits_pipeline()
    return LabelTeacher(pipe.unet, 10, NULL_LABEL), pipe.scheduler.config


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.safetensors"))}


def test_trajectories_are_cfg_states_independent_of_process_split_and_resume(teacher, tmp_path):
    teacher, config = teacher
    spec = TrajectorySpec(num_shards=3, shard_size=2, num_inference_steps=3, w_min=1.5, w_max=4.0, seed=100_000,
                          dtype="float32")  # exact states; half-precision storage: tests/test_distill_safety.py
    one = collect_trajectories(teacher, build_scheduler("fewstep:unipc", config), spec, tmp_path / "one",
                               process_index=0, num_processes=1, progress=False)
    for rank in (1, 0):  # two "processes", the second one late
        collect_trajectories(teacher, build_scheduler("fewstep:unipc", config), spec, tmp_path / "two",
                             process_index=rank, num_processes=2, progress=False)
    assert _files(one).keys() == {f"shard-0000{i}.safetensors" for i in range(3)}
    assert _files(one) == _files(tmp_path / "two")

    # A crash after shard 0: the rerun writes the missing shards only, and the same bytes.
    (one / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shards \[1\] are missing"):
        load_trajectories(one)
    kept = (one / "shard-00000.safetensors").stat().st_mtime_ns
    collect_trajectories(teacher, build_scheduler("fewstep:unipc", config), spec, one, process_index=0,
                         num_processes=1, progress=False)
    assert (one / "shard-00000.safetensors").stat().st_mtime_ns == kept
    assert _files(one) == _files(tmp_path / "two")

    records, manifest = load_trajectories(one)
    assert records["x"].shape == (3 * 2 * 3, 1, 8, 8) and manifest["scheduler"]["class"] == "FewstepScheduler"
    assert ((records["w"] >= 1.5) & (records["w"] <= 4.0)).all()
    # Every record is the teacher's real CFG output at the recorded state.
    i = torch.tensor([0, 7, 17])
    again = teacher.guided(records["x"][i], records["t"][i], records["cond"][i], records["w"][i])
    torch.testing.assert_close(again, records["target"][i])
    # The first states are shard 0's seeded noise (UniPC's init_noise_sigma is 1).
    g = torch.Generator().manual_seed(100_000)
    torch.randint(10, (2,), generator=g), torch.rand(2, generator=g)
    torch.testing.assert_close(records["x"][:2], torch.randn(2, 1, 8, 8, generator=g))

    other = TrajectorySpec(num_shards=3, shard_size=2, num_inference_steps=4, seed=100_000, dtype="float32")
    with pytest.raises(ValueError, match=r"another collection \(differs in \['spec'\]\)"):
        collect_trajectories(teacher, build_scheduler("fewstep:unipc", config), other, one, process_index=0,
                             num_processes=1, progress=False)
    with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'"):
        build_scheduler("NoSuchScheduler", config)


def _config(tmp_path, name, *extra):
    from fewstep.config import load_config

    return load_config(DistillConfig, ROOT / "configs/distill/digits.yaml",
                       overrides=[*TINY, f"output_dir={tmp_path / name}", f"trajectory_dir={tmp_path / 'traj'}",
                                  *extra])


class _Killed(Exception):
    pass


def test_kill_and_resume_reaches_the_same_adapters(tmp_path):
    extra = ["max_steps=6", "checkpointing_steps=2", "gradient_accumulation_steps=2", "validation_steps=0"]
    straight = train(_config(tmp_path, "straight", *extra))

    def crash(step):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train(_config(tmp_path, "resumed", *extra), step_callback=crash)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-4"
    assert not (tmp_path / "resumed" / "adapters").exists()
    resumed = train(_config(tmp_path, "resumed", *extra, "resume_from_checkpoint=latest"))

    a, b = load_file(straight / "adapters.safetensors"), load_file(resumed / "adapters.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(k.endswith("to_out.weight") and a[k].abs().sum() > 0 for k in a)  # it did train


def test_full_fine_tune_and_noised_data_options(tmp_path):
    base = load_digits_pipeline().unet.state_dict()
    out = train(_config(tmp_path, "full", "max_steps=2", "mode=full", "data=noised", "checkpointing_steps=0",
                        "validation_steps=2", "validation_guidance=[2.0]")).parent
    from diffusers import UNet2DModel

    tuned = UNet2DModel.from_pretrained(out / "model").state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)
    assert not (tmp_path / "traj").exists()  # noised data: no trajectories
    samples = load_file(out / "validation" / "step-000002.safetensors")
    assert samples["w2"].shape == (10, 1, 8, 8) and torch.isfinite(samples["w2"]).all()
    assert (out / "validation" / "step-000002.png").is_file()  # the same samples as an image grid


def test_cli_rejects_bad_settings_in_one_line(capsys, tmp_path):
    assert main(["--config", str(ROOT / "configs/distill/digits.yaml"), "mode=lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fewstep distill train: error:") and "mode must be one of ['adapters', 'full']" in err
    assert err.count("\n") == 1
    assert main(["--config", str(ROOT / "configs/distill/digits.yaml"), "learning_rat=1"]) == 2
    assert "learning_rat" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs/distill/sd15.yaml"), "data=noised"]) == 2
    assert "model=digits only" in capsys.readouterr().err
    assert main(["--config", str(ROOT / "configs/distill/digits.yaml"), f"resume_from_checkpoint={tmp_path}/nope"]) == 2
    assert "must be 'latest' or a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["sd", pytest.param("sd3", marks=pytest.mark.slow)])
def test_trained_adapters_run_text_pipelines_with_one_forward_per_step(kind, tmp_path):
    from fewstep.zoo.tiny import build_tiny_sd3_pipeline, build_tiny_sd_pipeline

    build = build_tiny_sd_pipeline if kind == "sd" else build_tiny_sd3_pipeline
    pipe = build(tmp_path / "pipe")
    scheduler = "DDIMScheduler" if kind == "sd" else "FlowMatchEulerDiscreteScheduler"
    out = train(_config(tmp_path, "agd", "model=" + str(tmp_path / "pipe"), "prompts=[a red cube,a blue ball]",
                        f"teacher_scheduler={scheduler}", "num_shards=1", "shard_size=2", "trajectory_steps=2",
                        "max_steps=2", "checkpointing_steps=0", "validation_steps=2",
                        "validation_prompts=[a blue ball]"))
    assert (tmp_path / "agd" / "validation" / "step-000002.safetensors").is_file()

    def run(w):
        return pipe(prompt="a red cube", guidance_scale=w, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    conditional = run(1.0)
    rows = []
    handle = denoiser.register_forward_pre_hook(lambda m, a, k: rows.append(len((a or [k["hidden_states"]])[0])),
                                                with_kwargs=True)
    try:
        run(4.0)
        cfg_rows, rows[:] = list(rows), []
        enable_guidance_adapters(pipe, out)
        guided = run(4.0)
    finally:
        handle.remove()
        disable_guidance_adapters(pipe, remove=True)
    # As many denoiser calls as real CFG makes, each on the conditional half only.
    assert set(cfg_rows) == {2} and rows == [1] * len(cfg_rows)
    assert torch.isfinite(guided).all() and not torch.equal(guided, conditional)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "dit"])
def test_real_model_recipes_parse(name):
    from fewstep.config import load_config

    cfg = load_config(DistillConfig, ROOT / f"configs/distill/{name}.yaml")
    assert cfg.mixed_precision == "bf16" and cfg.w_max > cfg.w_min and cfg.validation_prompts
    assert bool(cfg.prompts_file) == (name != "dit")  # DiT is class-conditional


@pytest.mark.slow
def test_two_process_torchrun_trains(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
               "-m", "fewstep", "distill", "train", "--config", str(ROOT / "configs/distill/digits.yaml"), *TINY,
               "num_shards=3", "max_steps=3", "checkpointing_steps=3", "validation_steps=0", "cpu=true",
               "batch_size=4",
               f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, check=True, env=env, timeout=600, capture_output=True)
    # Both ranks collected their shards and saved their RNG state; the adapters trained.
    assert sorted(p.name for p in (out / "trajectories").glob("shard-*")) == [f"shard-0000{i}.safetensors"
                                                                            for i in range(3)]
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    weights = load_file(out / "adapters" / "adapters.safetensors")
    assert any(k.endswith("to_out.weight") and weights[k].abs().sum() > 0 for k in weights)
    # Same data (shards do not depend on the split), batch 2 x 4 = 8: one process, batch 8, agrees.
    single = train(_config(tmp_path, "single", "num_shards=3", "max_steps=3", "checkpointing_steps=0",
                           "validation_steps=0", f"trajectory_dir={out / 'trajectories'}"))
    reference = load_file(single / "adapters.safetensors")
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
