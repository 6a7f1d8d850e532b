"""Options every command shares (nfe, guidance, seed, threads, device, --cache-dir): one validator and one
flag declaration each, so every command refuses a bad value with the same words."""

import math
import re
from pathlib import Path

import pytest

import fewstep
from fewstep.config import load_config
from fewstep.infra.validation import (
    check_count,
    check_guidance,
    check_guidance_list,
    check_nfe,
    check_nfe_list,
    check_reference_nfe,
    check_seed,
)

ROOT = Path(fewstep.__file__).parent


def _schemas():
    from fewstep.eval.compare import CompareConfig
    from fewstep.eval.runner import FIDConfig, MSEConfig
    from fewstep.tuning.dc.command import CalibrateDCConfig
    from fewstep.tuning.ems.command import EMSComputeConfig
    from fewstep.tuning.search.s3 import USFSearchConfig
    from fewstep.tuning.search.timesteps import TimestepSearchConfig

    # the settings a schema needs besides the one under test
    return [(CompareConfig, {}), (FIDConfig, {}), (MSEConfig, {}), (CalibrateDCConfig, {}),
            (EMSComputeConfig, {"out": "e.safetensors"}), (USFSearchConfig, {}), (TimestepSearchConfig, {})]


@pytest.mark.parametrize("key,value,words", [
    ("threads", 0, "threads=0 is out of range; allowed: >= 1"),
    ("device", "gpu0", "device 'gpu0' is not a device name"),
    ("guidance", math.nan, "guidance=nan is not allowed; it must be a finite number in [0, 10000]"),
    ("guidance", -2.0, "guidance=-2.0 is not allowed; it must be a finite number in [0, 10000]"),
    ("nfe", 0, "nfe=0 is out of range; allowed:"),
    ("seed", -1, "seed=-1 is out of range; allowed: 0 to"),
])
def test_every_command_refuses_a_shared_option_with_the_same_words(key, value, words):
    checked = 0
    for schema, needs in _schemas():
        fields = {f.name: f for f in schema.__dataclass_fields__.values()}
        if key not in fields:
            continue
        listed = "List" in str(fields[key].type) and key != "device"
        with pytest.raises(ValueError) as err:
            load_config(schema, flags={**needs, key: [value] if listed else value})
        assert words in str(err.value), (schema.__name__, str(err.value))
        checked += 1
    assert checked >= 3  # the option really is shared


def test_the_validators_name_the_value_and_what_is_allowed():
    assert check_nfe_list([5, 5, 6]) == [5, 6]  # --nfe 5 5 runs once
    with pytest.raises(ValueError, match="nfe must hold at least one value"):
        check_nfe_list([])
    with pytest.raises(ValueError, match=r"nfe=1 is out of range; allowed: 2 to 100000"):
        check_nfe_list([4, 1], minimum=2)
    with pytest.raises(TypeError, match="nfe=2.5 must be a whole number"):
        check_nfe(2.5)
    with pytest.raises(ValueError, match=r"reference_nfe=20 must be at least the largest nfe \(50\)"):
        check_reference_nfe(20, [5, 50])
    # the functional API takes any CFG scale of that size; the commands pass minimum=0
    assert check_guidance(-1.5) == -1.5
    with pytest.raises(ValueError, match=r"guidance=20000.0 is not allowed; .* in \[-10000, 10000\]"):
        check_guidance(2e4)
    assert check_guidance_list([2, 2.0, 3]) == [2.0, 3.0]
    with pytest.raises(ValueError, match=r"seed=9223372036854775808 is out of range; allowed: 0 to 9223372036854775807"):
        check_seed(2**63)
    assert check_count("batch_size", None, optional=True) is None
    with pytest.raises(ValueError, match="num_samples=1 is out of range; allowed: >= 2"):
        check_count("num_samples", 1, 2)


@pytest.mark.parametrize("flag", ["--model", "--device", "--threads", "--no-progress", "--cache-dir"])
def test_runtime_and_cache_flags_are_declared_once(flag):
    """``add_runtime_arguments`` / ``add_threads_argument`` / ``add_cache_dir_argument`` (fewstep/config.py)
    declare them; no parser spells them itself."""
    spelled = re.compile(r"add_argument\(\s*" + re.escape(repr(flag)).replace("'", "[\"']"))
    places = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if spelled.search(p.read_text())]
    assert places == ["config.py"], places


def test_every_job_parser_has_the_runtime_flags_from_one_declaration():
    """Each job command's --threads is the action config.py creates (same help wording), not its own copy."""
    from fewstep.cli import build_parser

    def leaves(parser):
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            yield parser
        for sub in subs:
            for child in sub.choices.values():
                yield from leaves(child)

    helps = {}
    for leaf in leaves(build_parser()[0]):
        for action in leaf._actions:
            if "--threads" in action.option_strings:
                helps[leaf.prog] = action.help
                assert action.metavar == "N" and action.dest == "threads"
    assert {"fewstep compare", "fewstep eval fid", "fewstep eval ref", "fewstep calibrate dc", "fewstep ems compute",
            "fewstep search usf", "fewstep search timesteps"} <= set(helps), sorted(helps)
    assert all(h.startswith("torch CPU threads") for h in helps.values()), helps


def test_eval_ref_and_eval_fid_share_one_cache_dir(tmp_path, capsys):
    """--cache-dir means fewstep's cache folder for every command: the statistics `eval ref` caches are the
    ones `eval fid` finds (they used to go to DIR itself and DIR/stats respectively)."""
    import numpy as np

    from fewstep.cli import main
    from fewstep.eval.runner import FIDConfig, _reference_stats

    source = tmp_path / "features.npz"
    np.savez(source, features=np.random.default_rng(0).standard_normal((12, 3)))
    cache = tmp_path / "cache"
    assert main(["eval", "ref", str(source), "--out", str(tmp_path / "r.npz"), "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    stats = sorted(cache.rglob("*.npz"))
    assert [p.parent for p in stats] == [cache / "stats"]
    written = stats[0].stat().st_mtime_ns
    logs = []
    _reference_stats(FIDConfig(ref=str(source), cache_dir=str(cache), progress=False), None, logs.append)  # eval fid's
    assert logs == [f"reference statistics: cached {stats[0]}"]
    assert sorted(cache.rglob("*.npz")) == stats and stats[0].stat().st_mtime_ns == written


def test_digits_training_runs_as_a_module_with_the_shared_threads_flag(monkeypatch, capsys):
    """`python -m fewstep.zoo.digits_train` (its __main__ guard) with --threads from config.add_threads_argument."""
    import runpy
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", ["digits_train", "evaluate", "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as done:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module may be imported already
        runpy.run_module("fewstep.zoo.digits_train", run_name="__main__")
    assert done.value.code == 0 and "--threads N" in capsys.readouterr().out
    from fewstep.zoo.digits_train import main

    with pytest.raises(ValueError, match="threads=0 is out of range; allowed: >= 1"):
        main(["export-data", "--threads", "0", "--out", "unused.npz"])
