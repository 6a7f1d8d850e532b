"""Tuned files (DC ratios, EMS, solver schedules) in eval/compare, and config keys that refuse strings.

Regression tests of hardening round 2 (issue 21 items 3 and 14).
"""

import dataclasses
import json

import pytest
import torch

from fewstep import UniPCScheduler
from fewstep.eval.compare import CompareConfig, Method, run_compare
from fewstep.eval.runner import MSEConfig, run_mse
from fewstep.samplers import make_schedule
from fewstep.samplers.artifacts import ArtifactMeta
from fewstep.samplers.dc_artifacts import DCRatios
from fewstep.samplers.ems import EMS, ems_lambda_grid
from fewstep.samplers.solver_schedule import SolverSchedule

GMM_DIM = 16  # the gmm testbed's sample size


def _tuned_files(folder):
    """A DC ratio file, a solver schedule and an (identity) EMS for the gmm testbed at NFE 3."""
    sched = make_schedule("linear")
    DCRatios([1.0, 1.0, 0.9], meta=ArtifactMeta(nfe=3)).save(folder / "r.json")
    SolverSchedule([999.0, 500.0, 100.0], meta=ArtifactMeta(nfe=3)).save(folder / "ts.json")
    lam = ems_lambda_grid(sched, 8)
    ones = torch.ones(9, GMM_DIM, dtype=torch.float64)
    meta = ArtifactMeta(schedule=sched.to_dict(), guidance=2.0)  # the gmm testbed's default guidance
    EMS(lam, ones, 0 * ones, 0 * ones, meta).save(folder / "e.safetensors")
    return [f"dc:dc_file={folder / 'r.json'}", "dc:ratios=[1,1,1.1]", f"unipc:solver_schedule={folder / 'ts.json'}",
            f"dpmv3:ems={folder / 'e.safetensors'}"]


def test_eval_mse_runs_every_tuned_solver_spec(tmp_path):
    """Each spec carrying a tuned file crashed with a TypeError (the run identity held the loaded object)."""
    specs = _tuned_files(tmp_path)
    cfg = MSEConfig(model="gmm", solvers=specs, nfe=[3], num_samples=4, batch_size=4, reference_nfe=6,
                    out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), plot=False, progress=False)
    results = run_mse(cfg, log=lambda *_: None)
    entries = {e["method"]: e["mse"] for e in results["entries"]}
    assert len(entries) == 4 and all(v is not None and v > 0 for v in entries.values())


def test_run_identity_holds_the_content_hash_not_the_path(tmp_path):
    path = tmp_path / "r.json"
    DCRatios([1.0, 1.0, 0.9], meta=ArtifactMeta(nfe=3)).save(path)
    method = Method.parse(f"dc:dc_file={path}")
    before = method.identity
    json.dumps(before)  # JSON-able: it goes into results.json and shard identities
    DCRatios([1.0, 1.0, 1.3], meta=ArtifactMeta(nfe=3)).save(path)  # rewritten in place
    assert method.identity != before and method.label == Method.parse(f"dc:dc_file={path}").label
    assert hash(Method.parse("dc:ratios=[1,1,1.1]")) == hash(Method.parse("dc:ratios=[1,1,1.1]"))


def test_compare_recomputes_a_method_whose_tuned_file_was_rewritten(tmp_path):
    path = tmp_path / "r.json"
    DCRatios([1.0, 1.0, 0.9], meta=ArtifactMeta(nfe=3)).save(path)
    cfg = CompareConfig(model="gmm", solvers=[f"dc:dc_file={path}"], nfe=[3], num_samples=8, reference_nfe=6,
                        out=str(tmp_path / "cmp"), cache_dir=str(tmp_path / "cache"), plot=False, progress=False)
    first = run_compare_quiet(cfg)
    DCRatios([1.0, 1.0, 2.5], meta=ArtifactMeta(nfe=3)).save(path)
    logs = []
    second = run_compare(_testbed(cfg), cfg, log=logs.append)
    fresh = run_compare_quiet(dataclasses.replace(cfg, out=str(tmp_path / "fresh")))
    assert any("recomputing" in line for line in logs)
    assert second["entries"][0]["mse"] == fresh["entries"][0]["mse"] != first["entries"][0]["mse"]


def _testbed(cfg):
    from fewstep.eval.testbeds import make_testbed

    return make_testbed(cfg.model, cfg.device)


def run_compare_quiet(cfg):
    return run_compare(_testbed(cfg), cfg, log=lambda *_: None)


# ---------------------------------------------------------------- item 14: boolean keys

@pytest.mark.parametrize("key", ["use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_flow_sigmas",
                                 "use_beta_sigmas", "lower_order_final", "euler_at_final", "predict_x0"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_boolean_config_keys_refuse_strings_and_numbers(key, value):
    from diffusers import DPMSolverMultistepScheduler

    config = {**DPMSolverMultistepScheduler().config, key: value, "_use_default_values": []}
    with pytest.raises(TypeError, match=f"{key}=.*must be True or False"):
        UniPCScheduler.from_config(config)


def test_use_karras_sigmas_string_false_is_not_read_as_true():
    from diffusers import DPMSolverMultistepScheduler

    base = DPMSolverMultistepScheduler().config
    with pytest.raises(TypeError, match="use_karras_sigmas='false'"):
        UniPCScheduler.from_config(base, use_karras_sigmas="false")
    plain = UniPCScheduler.from_config(base, use_karras_sigmas=False)
    karras = UniPCScheduler.from_config(base, use_karras_sigmas=True)
    assert not plain.config.use_karras_sigmas and karras.config.use_karras_sigmas is True
    for s in (plain, karras):
        s.set_timesteps(10)
    reference = UniPCScheduler.from_config(base, timestep_spacing="karras")
    reference.set_timesteps(10)
    assert torch.equal(karras.timesteps, reference.timesteps) and not torch.equal(plain.timesteps, karras.timesteps)


# ---------------------------------------------------------------- item 4: file references in scheduler configs

def _ems(n_grid=8, scale=1.0):
    sched = make_schedule("linear")
    ones = torch.ones(n_grid + 1, 3, dtype=torch.float64)
    return EMS(ems_lambda_grid(sched, n_grid), scale * ones, 0 * ones, 0 * ones, ArtifactMeta(schedule=sched.to_dict()))


def test_in_memory_round_trip_survives_a_reload_of_the_same_file(tmp_path):
    """Reproducer 09: loading the same EMS again and dropping it replaced (then lost) the registry entry."""
    import gc

    from fewstep import DPMSolverV3Scheduler

    path = _ems().save(tmp_path / "e.safetensors")
    s = DPMSolverV3Scheduler.from_config({}, ems=str(path))
    DPMSolverV3Scheduler.from_config({}, ems=str(path))  # a second copy of the same content, then dropped
    gc.collect()
    assert DPMSolverV3Scheduler.from_config(s.config).solver.config["ems"] is s.solver.config["ems"]


def test_a_file_in_the_working_directory_never_shadows_the_referenced_artifact(tmp_path, monkeypatch):
    from fewstep import DPMSolverV3Scheduler

    s = DPMSolverV3Scheduler.from_config({}, ems=_ems())
    _ems(scale=2.0).save(tmp_path / EMS.filename)  # an unrelated EMS under the referenced name
    monkeypatch.chdir(tmp_path)
    assert DPMSolverV3Scheduler.from_config(s.config).solver.config["ems"] == s.solver.config["ems"]
    s.save_pretrained(tmp_path / "sched")
    del s
    import gc

    gc.collect()
    # Nothing in memory, no folder: the cwd copy is not taken in its place.
    config = json.loads((tmp_path / "sched" / "scheduler_config.json").read_text())
    with pytest.raises(ValueError, match="not found; load the scheduler with from_pretrained"):
        DPMSolverV3Scheduler.from_config(config)


@pytest.mark.parametrize("name", ["/abs/e.safetensors", "../e.safetensors", "sub/e.safetensors", "..", ".",
                                  "..\\e.safetensors", ""])
def test_config_file_references_stay_in_the_config_folder(tmp_path, name):
    """Reproducer 10: a saved config may name only a plain file beside it."""
    from fewstep import DPMSolverV3Scheduler

    other = _ems(scale=3.0)
    (tmp_path / "sub").mkdir()
    for where in (tmp_path / "e.safetensors", tmp_path / "sub" / "e.safetensors"):
        other.save(where)
    DPMSolverV3Scheduler.from_config({}, ems=_ems()).save_pretrained(tmp_path / "sched")
    cfg_path = tmp_path / "sched" / "scheduler_config.json"
    config = json.loads(cfg_path.read_text())
    config["solver_options"]["ems"] = {"file": name, "sha256": other.sha256()}
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="may only reference a file beside it by a plain name"):
        DPMSolverV3Scheduler.from_pretrained(tmp_path / "sched")


def test_config_file_references_need_their_sha256(tmp_path):
    from fewstep import DPMSolverV3Scheduler

    ems = _ems()
    DPMSolverV3Scheduler.from_config({}, ems=ems).save_pretrained(tmp_path)
    cfg_path = tmp_path / "scheduler_config.json"
    config = json.loads(cfg_path.read_text())
    for bad in ({"file": EMS.filename}, {"file": EMS.filename, "sha256": "abc"}):
        config["solver_options"]["ems"] = bad
        cfg_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match="without a valid sha256"):
            DPMSolverV3Scheduler.from_pretrained(tmp_path)
    config["solver_options"]["ems"] = {"file": EMS.filename, "sha256": ems.sha256()}
    cfg_path.write_text(json.dumps(config))
    assert DPMSolverV3Scheduler.from_pretrained(tmp_path).solver.config["ems"] == ems


def test_eval_recomputes_shards_of_a_rewritten_tuned_file(tmp_path):
    path = tmp_path / "r.json"
    DCRatios([1.0, 1.0, 0.9], meta=ArtifactMeta(nfe=3)).save(path)
    cfg = MSEConfig(model="gmm", solvers=[f"dc:dc_file={path}"], nfe=[3], num_samples=4, batch_size=4,
                    reference_nfe=6, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), plot=False,
                    progress=False)
    first = run_mse(cfg, log=lambda *_: None)["entries"][0]["mse"]
    DCRatios([1.0, 1.0, 2.5], meta=ArtifactMeta(nfe=3)).save(path)
    second = run_mse(cfg, log=lambda *_: None)["entries"][0]["mse"]
    fresh = run_mse(dataclasses.replace(cfg, out=str(tmp_path / "fresh")), log=lambda *_: None)["entries"][0]["mse"]
    assert second == fresh != first


def test_results_from_before_content_hashes_are_kept_unless_a_tuned_file_is_involved():
    from fewstep.eval.compare import _drop_stale_entries

    path_free = Method.parse("unipc:order=3")
    tuned = Method.parse("dc:ratios=[1,1,1.1]")
    results = {"entries": [{"method": path_free.label, "nfe": 3}, {"method": tuned.label, "nfe": 3},
                           {"method": path_free.label, "nfe": 5, "canonical": path_free.identity}]}
    _drop_stale_entries(results, [path_free, tuned], log=lambda *_: None)
    assert [(e["method"], e["nfe"]) for e in results["entries"]] == [(path_free.label, 3), (path_free.label, 5)]
    assert not path_free.carries_tuned_file and tuned.carries_tuned_file
