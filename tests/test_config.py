"""The one config mechanism: schema defaults < --config FILE < given flags < key=value overrides."""

import argparse
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from fewstep.config import (
    add_config_arguments,
    load_config,
    resolve_config,
    resolve_device,
    save_config,
    split_overrides,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Toy:
    model: str = "digits"
    nfe: List[int] = field(default_factory=lambda: [5, 6])
    seed: int = 0
    guidance: Optional[float] = None
    progress: bool = True

    def __post_init__(self):
        if min(self.nfe) < 1:
            raise ValueError(f"nfe must be >= 1, got {self.nfe}")


def _parser():
    p = argparse.ArgumentParser(prog="fewstep toy", argument_default=argparse.SUPPRESS)
    p.add_argument("--model")
    p.add_argument("--nfe", type=int, nargs="+")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    add_config_arguments(p, Toy)
    return p


def _resolve(argv):
    argv, overrides = split_overrides(argv, Toy)
    args = _parser().parse_args(argv)
    args.overrides = [*args.overrides, *overrides]
    return resolve_config(Toy, args)


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: gmm\nnfe: [3, 4]\nseed: 7\n")
    assert _resolve([]) == Toy()
    assert _resolve(["--config", str(f)]) == Toy(model="gmm", nfe=[3, 4], seed=7)
    # a given flag beats the file, a flag not given leaves the file's value alone
    assert _resolve(["--config", str(f), "--seed", "1"]) == Toy(model="gmm", nfe=[3, 4], seed=1)
    # key=value beats both, wherever it stands (even after a flag taking several values)
    got = _resolve(["--config", str(f), "--nfe", "8", "9", "seed=2", "--seed", "1", "guidance=7.5", "nfe=10"])
    assert got == Toy(model="gmm", nfe=[10], seed=2, guidance=7.5)
    assert _resolve(["--no-progress"]).progress is False


def test_unknown_keys_wrong_types_and_bad_files_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"key=value overrides: Key 'sede' not in 'Toy'"):
        _resolve(["sede=3"])
    with pytest.raises(ValueError, match=r"could not be converted to Integer \(key 'seed'\)"):
        load_config(Toy, overrides=["seed=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: gmm\n")
    with pytest.raises(ValueError, match=rf"{bad}: Key 'modle' not in 'Toy'"):
        load_config(Toy, bad)
    bad.write_text("nfe: [5, 6\n")
    with pytest.raises(ValueError, match=rf"{bad} is not valid YAML"):
        load_config(Toy, bad)
    bad.write_text("- 5\n- 6\n")
    with pytest.raises(ValueError, match=rf"{bad} must hold a mapping"):
        load_config(Toy, bad)
    with pytest.raises(ValueError, match=r"nfe must be >= 1, got \[0\]"):  # __post_init__ runs
        load_config(Toy, overrides=["nfe=[0]"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(Toy, overrides=["seed"])
    with pytest.raises(FileNotFoundError):
        load_config(Toy, tmp_path / "missing.yaml")
    assert load_config(Toy, overrides=["nfe=8"]).nfe == [8]  # a scalar for a list key


def test_saved_config_round_trips_with_normal_permissions(tmp_path):
    cfg = load_config(Toy, overrides=["model=gmm", "nfe=[4,8]", "guidance=2.5"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml" and load_config(Toy, path) == cfg
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left


def test_split_overrides_takes_only_schema_keys():
    argv = ["compare", "--solvers", "ddim", "unipc:order=3", "nfe=[4]", "--prompt", "style=oil", "seed=1"]
    rest, overrides = split_overrides(argv, Toy)
    assert overrides == ["nfe=[4]", "seed=1"]
    assert rest == ["compare", "--solvers", "ddim", "unipc:order=3", "--prompt", "style=oil"]


def test_parser_must_suppress_absent_flags():
    with pytest.raises(TypeError, match="argument_default=argparse.SUPPRESS"):
        add_config_arguments(argparse.ArgumentParser(), Toy)


def test_devices_are_checked_up_front():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'not-a-device' is not a device name"):
        resolve_device("not-a-device")
    with pytest.raises(ValueError, match="'meta' is not supported"):
        resolve_device("meta")
    if torch.version.cuda is None:
        with pytest.raises(ValueError, match=r"this torch build \(.*\) has no CUDA support"):
            resolve_device("cuda")


def test_every_compare_preset_is_a_valid_config():
    from fewstep.eval.compare import CompareConfig

    presets = sorted((CONFIGS / "compare").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"digits", "gmm", "smoke", "pipeline"}
    for p in presets:
        load_config(CompareConfig, p)
