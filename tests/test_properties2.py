"""Property tests of the newer APIs (issue 21): ``calibrate_dc``, ``compute_ems``, the searches and the
eval statistics/config APIs. Any input either works (a finite result) or fails with a ValueError /
TypeError raised by fewstep whose message names what was wrong (helpers: tests/test_properties.py).

Everything is tiny (2-d data, NFE <= 4, budgets <= 3) so the 500 examples of the CI profile stay cheap.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_properties import _check_outcome, _junk  # noqa: E402

import fewstep  # noqa: E402

CHEAP = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)


def tiny_model(x, t, *cond):
    """Differentiable (forward and reverse mode) and bounded."""
    return 0.5 * torch.tanh(x) + 0.1


# test_properties' junk without its 10**7: a valid size this large would run for hours here.
_small_junk = _junk.filter(lambda v: not (isinstance(v, int) and abs(v) > 1000))


def _junk_one(draw, kwargs: dict, extra: list[str]) -> None:
    """In 40% of draws, one argument (or an unknown one) becomes junk."""
    if draw(st.integers(0, 9)) < 4:
        kwargs[draw(st.sampled_from(sorted(kwargs) + extra))] = draw(_small_junk)


def _outcome(call, kwargs: dict, names: set[str]):
    """_check_outcome, where an unknown keyword is Python's own TypeError naming it."""
    if "bogus" in kwargs:  # refused: by name, unless another argument is refused first
        with pytest.raises((TypeError, ValueError)):
            call()
        return None
    return _check_outcome(call, set(kwargs) | names)


def _finite(values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


# ------------------------------------------------------------------------ calibrate_dc

@st.composite
def calibrate_arguments(draw):
    n = draw(st.integers(1, 3))
    kwargs = dict(schedule=draw(st.sampled_from(["linear", "scaled_linear", "vp_cosine"])),
                  nfe=draw(st.integers(3, 4)), iterations=draw(st.integers(0, 1)),
                  reference_nfe=draw(st.integers(1, 3)), lr=draw(st.sampled_from([0.1, 0.1, 1e-3, 1e300])),
                  solver=draw(st.sampled_from(["dc", "dc", "dc_dpmpp"])))
    if draw(st.booleans()):
        kwargs["batch_size"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        kwargs["lr_schedule"] = draw(st.sampled_from(["constant", "cosine"]))
    if draw(st.booleans()):
        kwargs["bounds"] = draw(st.sampled_from([None, (0.5, 1.5), (0.0, 3.0)]))
    if draw(st.booleans()):
        kwargs["spacing"] = draw(st.sampled_from(["logsnr", "time_uniform", "karras", "trailing"]))
    if draw(st.integers(0, 3)) == 0:
        kwargs.update(guidance=draw(st.floats(-1, 8)), cond=torch.zeros(n, dtype=torch.long),
                      uncond=torch.ones(n, dtype=torch.long))
    if draw(st.integers(0, 4)) == 0:
        kwargs["reference"] = draw(st.sampled_from([torch.zeros(n, 2), torch.zeros(n + 1, 2),
                                                    torch.full((n, 2), math.nan)]))
    _junk_one(draw, kwargs, ["bogus", "dc_order", "ratios", "lr", "bounds", "lr_schedule"])
    x = draw(st.sampled_from(["ok", "empty", "grad", "int"]) if draw(st.integers(0, 9)) == 0 else st.just("ok"))
    x_T = {"ok": torch.randn(n, 2, generator=torch.Generator().manual_seed(n)), "empty": torch.zeros(0, 2),
           "grad": torch.zeros(n, 2, requires_grad=True), "int": torch.zeros(n, 2, dtype=torch.long)}[x]
    return x_T, kwargs


@CHEAP
@given(args=calibrate_arguments())
def test_calibrate_dc_any_input_works_or_fails_clearly(args):
    x_T, kwargs = args
    result = _outcome(lambda: fewstep.calibrate_dc(tiny_model, x_T, **kwargs), kwargs,
                      {"ratio", "lr", "bounds", "reference", "batch"})
    if result is not None:
        assert len(result.ratios) == kwargs["nfe"] and _finite(result.ratios)


# ------------------------------------------------------------------------ compute_ems

def _data(dim: int, guided: bool):
    def sampler(indices):
        g = torch.Generator().manual_seed(int(indices.sum()))
        x0 = torch.randn(indices.numel(), dim, generator=g)
        cond = torch.zeros(indices.numel(), dtype=torch.long)
        return (x0, cond, cond + 1) if guided else x0
    return sampler


@st.composite
def ems_arguments(draw):
    kwargs = dict(schedule=draw(st.sampled_from(["linear", "vp_cosine", "flow"])),
                  n_grid=draw(st.integers(1, 2)), n_data=draw(st.integers(2, 3)), batch_size=draw(st.integers(1, 3)),
                  chunk_size=draw(st.integers(1, 2)), seed=draw(st.integers(0, 2**40)), progress=False)
    kwargs["prediction"] = "flow" if kwargs["schedule"] == "flow" else draw(st.sampled_from(["epsilon", "sample"]))
    if draw(st.integers(0, 3)) == 0:
        kwargs["guidance"] = draw(st.floats(-1, 8))
    if draw(st.integers(0, 3)) == 0:
        kwargs["t_start"], kwargs["t_end"] = draw(st.sampled_from([(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (2.0, 0.1)]))
    _junk_one(draw, kwargs, ["bogus", "device"])
    return kwargs


@CHEAP
@given(kwargs=ems_arguments())
def test_compute_ems_any_input_works_or_fails_clearly(kwargs):
    guided = isinstance(kwargs.get("guidance"), (int, float)) and not isinstance(kwargs.get("guidance"), bool)
    data = _data(2, guided)
    ems = _outcome(lambda: fewstep.compute_ems(tiny_model, data, **kwargs), kwargs,
                   {"grid", "data", "t_start", "t_end", "lambda", "log-SNR"})
    if ems is not None:
        assert all(bool(torch.isfinite(t).all()) for t in (ems.l, ems.s, ems.b))


# ------------------------------------------------------------------------ the searches

@pytest.fixture(scope="module")
def tiny_gmm(tmp_path_factory):
    """A 2-d, 2-component GMM testbed; its references are cached under the module's cache."""
    import os

    from fewstep.eval.testbeds import GMMTestbed

    os.environ.setdefault("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("cache")))
    return GMMTestbed(dim=2, components=2, num_classes=2)


@st.composite
def search_arguments(draw):
    which = draw(st.sampled_from(["usf", "timesteps"]))
    kwargs = dict(nfe=draw(st.integers(1, 3)), budget=draw(st.integers(1, 2)), num_samples=2,
                  guidance=draw(st.sampled_from([None, 1.0, 2.0])), progress=False)
    if which == "usf":
        kwargs.update(init_screen=0, init_size=2, init_spacings=["logsnr"], random_init=draw(st.integers(0, 2)),
                      pool=2, per_generation=1, warmup=2, max_order=draw(st.integers(1, 4)))
    else:
        kwargs.update(solver=draw(st.sampled_from(["unipc", "ddim", "dpmpp:order=3", "unipc:order=9", "nope"])),
                      starts=["logsnr"], finals=draw(st.sampled_from([["zero"], ["min"], ["zero", "min"]])))
    if draw(st.booleans()):
        kwargs["metric"] = draw(st.sampled_from(["mse", "fd", "psnr"]))
    _junk_one(draw, kwargs, ["bogus", "data_seed", "reference_nfe", "reference"])
    return which, kwargs


@CHEAP
@given(args=search_arguments())
def test_search_apis_any_input_works_or_fail_clearly(tiny_gmm, args):
    from fewstep.tuning.search import search_timesteps, search_usf

    which, kwargs = args
    run = search_usf if which == "usf" else search_timesteps
    with tempfile.TemporaryDirectory() as tmp:
        sched = _outcome(lambda: run(tiny_gmm, out=str(Path(tmp) / "s.json"), log=lambda m: None, **kwargs), kwargs,
                         {"reference", "metric", "budget", "NFE", "solver", "diverged"})
    if sched is not None:
        assert _finite(sched.timesteps) and math.isfinite(sched.meta.extra["search"]["best_fitness"])


# ------------------------------------------------------------------------ eval statistics and settings

@st.composite
def stats_arguments(draw):
    d = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["psd", "psd", "neg", "asym", "nan", "shape", "junk"]))
    rs = np.random.RandomState(draw(st.integers(0, 100)))
    a = rs.randn(d, d)
    sigma = {"psd": a @ a.T, "neg": -(a @ a.T) - np.eye(d), "asym": a + 3 * np.eye(d),
             "nan": np.full((d, d), np.nan), "shape": np.eye(d + 1), "junk": draw(_small_junk)}[kind]
    return rs.randn(d), sigma, draw(st.one_of(st.none(), st.integers(-1, 5), _small_junk))


@CHEAP
@given(args=stats_arguments())
def test_statistics_files_any_content_loads_or_fails_clearly(args):
    from fewstep.eval.metrics.stats import GaussianStats

    mu, sigma, n = args
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.npz"
        try:
            np.savez(path, mu=mu, sigma=np.asarray(sigma), **({} if n is None else {"n": np.asarray(n)}))
        except (TypeError, ValueError):
            return  # numpy cannot store it: no file to read
        stats = _check_outcome(lambda: GaussianStats.load(path), {"sigma", "mu", "n", "s.npz"})
        if stats is not None:
            assert math.isfinite(stats.frechet_distance(stats)) and stats.frechet_distance(stats) < 1e-6


@st.composite
def eval_settings(draw):
    kwargs = dict(model=draw(st.sampled_from(["gmm", "digits"])),
                  solvers=draw(st.lists(st.sampled_from(["ddim", "unipc", "dpmpp:order=3", "nope", "unipc:order=0"]),
                                        min_size=1, max_size=2)),
                  nfe=draw(st.lists(st.integers(0, 6), min_size=1, max_size=2)),
                  num_samples=draw(st.integers(0, 4)), batch_size=draw(st.integers(0, 4)),
                  seed=draw(st.sampled_from([0, -1, 2**63])), guidance=draw(st.sampled_from([None, 0.0, 2.0, math.nan])))
    _junk_one(draw, kwargs, ["bogus", "spacing", "reference_nfe", "extractor", "out"])
    return draw(st.sampled_from(["mse", "fid"])), kwargs


@CHEAP
@given(args=eval_settings())
def test_eval_settings_any_input_validates_or_fails_clearly(args):
    """The eval commands' settings (what ``run_mse`` / ``run_fid`` take) through the config layer."""
    from fewstep.config import load_config
    from fewstep.eval.runner import FIDConfig, MSEConfig

    kind, kwargs = args
    schema = MSEConfig if kind == "mse" else FIDConfig
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    try:
        cfg = load_config(schema, flags=flags)
    except ValueError as exc:  # the config layer turns every type and value error into a ValueError
        msg = str(exc)
        assert any(k in msg for k in set(kwargs) | {"solver", "nfe", "guidance", "reference"}), msg
        return
    assert min(cfg.nfe) >= 1 and all(v is None or v >= 1 for v in (cfg.num_samples, cfg.batch_size))
    assert cfg.guidance is None or math.isfinite(cfg.guidance)


# ------------------------------------------------------------------------ the distill config

_DISTILL_VALID = {
    "mode": st.sampled_from(["adapters", "full"]), "data": st.sampled_from(["trajectories", "noised"]),
    "placement": st.sampled_from(["attention", "attention+resnet"]),
    "width_ratio": st.floats(0.05, 2.0), "head_dim": st.sampled_from([8, 16, 64]),
    "trajectory_steps": st.integers(1, 50), "num_shards": st.integers(1, 8), "shard_size": st.integers(1, 64),
    "trajectory_dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
    "w_min": st.floats(1.0, 3.0), "w_max": st.floats(3.0, 12.0), "max_steps": st.integers(1, 1000),
    "batch_size": st.integers(1, 64), "gradient_accumulation_steps": st.integers(1, 4),
    "learning_rate": st.floats(1e-6, 1e-2), "weight_decay": st.floats(0.0, 0.1), "warmup_steps": st.integers(0, 50),
    "max_grad_norm": st.floats(0.0, 10.0), "mixed_precision": st.sampled_from(["no", "bf16", "fp16"]),
    "torch_dtype": st.sampled_from(["auto", "float32", "bfloat16"]), "gradient_checkpointing": st.booleans(),
    "seed": st.integers(0, 2**31), "checkpointing_steps": st.integers(0, 100),
    "validation_steps": st.integers(0, 100), "validation_guidance": st.lists(st.floats(1.0, 12.0), min_size=1,
                                                                             max_size=3),
}


@st.composite
def distill_settings(draw):
    names = draw(st.lists(st.sampled_from(sorted(_DISTILL_VALID)), min_size=1, max_size=6, unique=True))
    kwargs = {k: draw(_DISTILL_VALID[k]) for k in names}
    _junk_one(draw, kwargs, [])
    return kwargs


@CHEAP
@given(kwargs=distill_settings())
def test_distill_settings_any_input_validates_or_fails_clearly(kwargs):
    """``fewstep distill train`` settings through the config layer: a config whose numbers are usable, or one
    ValueError naming the setting (the trainer checks the rest before any work)."""
    from fewstep.config import load_config
    from fewstep.distill.settings import DistillConfig

    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    try:
        cfg = load_config(DistillConfig, flags=flags)
    except ValueError as exc:  # the config layer turns every type and value error into a ValueError
        msg = str(exc)
        assert any(k in msg for k in kwargs), msg
        return
    assert cfg.max_steps >= 1 and cfg.batch_size >= 1 and cfg.gradient_accumulation_steps >= 1
    assert cfg.num_shards >= 1 and cfg.shard_size >= 1 and cfg.trajectory_steps >= 1
    assert _finite([cfg.w_min, cfg.w_max, cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm])
    assert 1.0 <= cfg.w_min <= cfg.w_max and 0 < cfg.learning_rate <= 1
    assert all(math.isfinite(w) for w in cfg.validation_guidance)
