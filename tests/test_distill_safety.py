"""AGD training safety: shard validation, non-finite stops, run identity, no pickle, folder lock, kill -9."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.cli import main as fewstep_main
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import NonFiniteTrainingError, _check_finite, latest_checkpoint, train
from fewstep.distill.trajectories import (
    LabelTeacher, TrajectoryShards, TrajectorySpec, build_scheduler, collect_trajectories, load_trajectories,
)
from fewstep.zoo.digits import NULL_LABEL, load_digits_pipeline

ROOT = Path(__file__).resolve().parent.parent


def main(argv):  # ``fewstep distill train ARGV``
    return fewstep_main(["distill", "train", *argv])

DIGITS = str(ROOT / "configs/distill/digits.yaml")
TINY = ["num_shards=2", "shard_size=4", "trajectory_steps=3", "batch_size=8", "width_ratio=0.25", "head_dim=16",
        "report_to=none", "progress=false", "warmup_steps=2", "learning_rate=1e-2", "logging_steps=1",
        "validation_steps=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def teacher():
    pipe = load_digits_pipeline()
    return LabelTeacher(pipe.unet, 10, NULL_LABEL), pipe.scheduler.config


def _collect(teacher, folder, **spec):
    teacher, config = teacher
    spec = TrajectorySpec(**{"num_shards": 2, "shard_size": 2, "num_inference_steps": 2, **spec})
    return collect_trajectories(teacher, build_scheduler("DDIMScheduler", config), spec, folder, process_index=0,
                                num_processes=1, progress=False)


def _config(tmp_path, name, *extra):
    from fewstep.config import load_config

    return load_config(DistillConfig, DIGITS, overrides=[*TINY, f"output_dir={tmp_path / name}",
                                                         f"trajectory_dir={tmp_path / 'traj'}", *extra])


def _cli(capsys, tmp_path, name, *extra):
    code = main(["--config", DIGITS, *TINY, f"output_dir={tmp_path / name}", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code, lines


def test_half_precision_shards_hold_the_float32_states_rounded(teacher, tmp_path):
    full = _collect(teacher, tmp_path / "f32", dtype="float32")
    half = _collect(teacher, tmp_path / "f16")  # the default
    a, _ = load_trajectories(full)
    b, manifest = load_trajectories(half)
    assert manifest["spec"]["dtype"] == "float16"
    for key in a:  # the same computation, rounded once when stored: exact by construction
        expect = a[key].half().float() if key in ("x", "target") else a[key]
        assert torch.equal(b[key], expect), key
    shard = "shard-00000.safetensors"
    assert (half / shard).stat().st_size < 0.6 * (full / shard).stat().st_size
    # Rows read one by one from the files equal the whole collection read at once.
    rows = TrajectoryShards(half).rows(torch.tensor([7, 0, 3, 3]))
    assert torch.equal(rows["target"].float(), b["target"][[7, 0, 3, 3]]) and rows["x"].dtype == torch.float16


def test_truncated_or_foreign_shards_are_refused_in_one_line(teacher, tmp_path, capsys):
    good = _collect(teacher, tmp_path / "good")
    other = _collect(teacher, tmp_path / "other", seed=7)
    shard0, shard1 = good / "shard-00000.safetensors", good / "shard-00001.safetensors"
    original = shard1.read_bytes()

    shard1.write_bytes(original[:500])  # (a) truncated
    with pytest.raises(ValueError, match="shard-00001.safetensors is truncated"):
        TrajectoryShards(good)
    with pytest.raises(ValueError, match="is truncated"):  # a rerun of the collection says so too
        _collect(teacher, good)
    shard1.write_bytes(original[:5])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TrajectoryShards(good)

    shard1.write_bytes((other / "shard-00001.safetensors").read_bytes())  # (b) another collection's shard
    with pytest.raises(ValueError, match="belongs to another collection"):
        TrajectoryShards(good)
    shard1.write_bytes(shard0.read_bytes())  # (c) this collection's shard 0 in slot 1
    with pytest.raises(ValueError, match="holds shard 0 of this collection, not shard 1"):
        TrajectoryShards(good)

    # Through the CLI: one line naming the shard, no training.
    traj = tmp_path / "cli" / "trajectories"
    assert main(["--config", DIGITS, *TINY, f"output_dir={tmp_path / 'cli'}", "max_steps=1"]) == 0
    out = capsys.readouterr().out  # the run starts with `fewstep distill estimate`'s figures
    assert "trajectories on disk:" in out and "GPU memory per process:" in out
    path = traj / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    code, lines = _cli(capsys, tmp_path, "cli", "max_steps=1")
    assert code == 2 and len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0], lines


def test_non_finite_settings_data_or_weights_stop_with_one_line(tmp_path, capsys):
    for bad, key in (("w_max=inf", "w_max"), ("weight_decay=inf", "weight_decay"),
                     ("validation_guidance=[nan]", "validation_guidance"), ("learning_rate=1e38", "learning_rate must be in")):
        code, lines = _cli(capsys, tmp_path, "cfg", bad)
        assert code == 2 and len(lines) == 1 and key in lines[0], (bad, lines)
    # A finite but absurd guidance scale: the CFG targets overflow at the first step.
    code, lines = _cli(capsys, tmp_path, "w", "w_min=1e30", "w_max=1e30", "trajectory_dtype=float32")
    assert code == 2 and len(lines) == 1, lines
    assert "trajectory shard 0, step " in lines[0] and "is not finite" in lines[0]
    assert not list((tmp_path / "w" / "trajectories").glob("shard-*")) and not (tmp_path / "w" / "adapters").exists()
    # fp16 storage: a target beyond its range is refused, not stored as inf.
    code, lines = _cli(capsys, tmp_path, "w16", "w_min=1e8", "w_max=1e8", "trajectory_dtype=float16")
    assert code == 2 and "overflows float16 storage" in lines[0], lines
    # Weights that went non-finite after an optimizer step (the check every step runs):
    accelerator = type("Single", (), {"num_processes": 1})()
    _check_finite(accelerator, 3, torch.tensor(False), [torch.ones(2)])
    with pytest.raises(NonFiniteTrainingError, match="stopped at step 3: the trainable weights are not finite"):
        _check_finite(accelerator, 3, torch.tensor(False), [torch.ones(2), torch.tensor([1.0, float("inf")])])
    from fewstep.distill import GuidanceAdapters, save_adapters

    adapters = GuidanceAdapters(load_digits_pipeline().unet)
    with torch.no_grad():
        next(adapters.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="the adapters are not finite"):
        save_adapters(adapters, tmp_path / "nan-adapters")
    assert not (tmp_path / "nan-adapters" / "adapters.safetensors").exists()
    # NaN in a stored trajectory: the loss of the batch that reads it stops the run.
    traj = tmp_path / "nan" / "trajectories"
    assert _cli(capsys, tmp_path, "nan", "max_steps=1", "num_shards=1", "batch_size=64")[0] == 0
    path = traj / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-200:] = b"\xff" * 200  # NaN bit patterns in the last tensor's tail
    path.write_bytes(bytes(data))
    with pytest.raises(NonFiniteTrainingError, match="step 1: the training loss is not finite"):
        train(_config(tmp_path, "nan", "max_steps=1", "num_shards=1", "batch_size=64", f"trajectory_dir={traj}"))


def test_resume_refuses_another_runs_checkpoint_and_never_unpickles(tmp_path, monkeypatch):
    extra = ["max_steps=2", "checkpointing_steps=1"]
    train(_config(tmp_path, "run", *extra))
    shutil.rmtree(latest_checkpoint(tmp_path / "run"))
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-1"
    with pytest.raises(ValueError, match=r"belongs to a run with other settings \(differs in: \['learning_rate', "
                                         r"'seed'\]\)"):
        train(_config(tmp_path, "run", *extra, "learning_rate=5e-2", "seed=7", "resume_from_checkpoint=latest"))
    with pytest.raises(ValueError, match=r"differs in: \['learning_rate'\]"):  # a fresh run there, too
        train(_config(tmp_path, "run", *extra, "learning_rate=5e-2"))

    # A crafted pickle in the checkpoint never runs; every torch.load of the resume is weights_only.
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": Evil()}, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl, a pickle that fewstep does not write"):
        train(_config(tmp_path, "run", *extra, "resume_from_checkpoint=latest"))
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    calls = []
    real_load = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    train(_config(tmp_path, "run", *extra, "resume_from_checkpoint=latest"))
    assert not marker.exists() and calls and all(c is True for c in calls), calls
    # A checkpoint without fewstep's JSON state (as older fewstep wrote them) is refused, not unpickled.
    (checkpoint / "fewstep_state.json").unlink()
    with pytest.raises(ValueError, match="not a fewstep distill checkpoint"):
        train(_config(tmp_path, "run", *extra, "resume_from_checkpoint=latest"))
    assert not marker.exists()


_KILL_AT_5 = """
import os, signal, sys
from fewstep.config import load_config
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import train
cfg = load_config(DistillConfig, sys.argv[1], overrides=sys.argv[2:])
train(cfg, step_callback=lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == 5 else None)
"""


def test_kill_9_then_resume_gives_the_same_adapters(tmp_path):
    extra = ["max_steps=6", "checkpointing_steps=2", "gradient_accumulation_steps=2",
             f"trajectory_dir={tmp_path / 'traj'}"]
    straight = train(_config(tmp_path, "straight", *extra))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_5, DIGITS, *TINY, f"output_dir={tmp_path / 'k'}", *extra],
                            env=ENV, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "k").name == "checkpoint-4" and not (tmp_path / "k" / "adapters").exists()
    resumed = train(_config(tmp_path, "k", *extra, "resume_from_checkpoint=latest"))
    a, b = load_file(straight / "adapters.safetensors"), load_file(resumed / "adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same kernels, same batches


def test_second_run_on_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fewstep.infra.io import lock_directory\n"
         "with lock_directory(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, lines = _cli(capsys, tmp_path, "busy", "max_steps=1")
        assert code == 2 and len(lines) == 1 and "in use by another fewstep distill train run" in lines[0], lines
        assert not (out / "trajectories").exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    from fewstep.infra.io import lock_directory

    with lock_directory(out):  # a killed holder leaves no stale lock
        pass
