"""The artifact pattern: validated files, inline and file-backed, carried by save_pretrained."""

import json
import warnings

import pytest
import torch

import fewstep
from fewstep import Artifact, ArtifactError, ArtifactMeta, FewstepScheduler, model_fingerprint
from fewstep.samplers import registry
from fewstep.samplers.plan import SolverPlan
from fewstep.samplers.solvers.base import Option, Solver, StepGeometry, empty_tables
from fewstep.zoo.gmm import GaussianMixture, GMMModel


class StepWeights(Artifact):
    """Toy inline artifact: one weight per step."""

    kind = "toy_step_weights"

    def __init__(self, weights, meta=None):
        super().__init__(meta)
        self.weights = [float(w) for w in weights]

    def payload(self):
        return {"weights": self.weights}

    @classmethod
    def from_payload(cls, payload, meta, tensors=None):
        weights = payload.get("weights")
        if not isinstance(weights, list) or not all(isinstance(w, (int, float)) for w in weights):
            raise ValueError(f"weights must be a list of numbers, got {weights!r}")
        return cls(weights, meta)


class Offsets(Artifact):
    """Toy file-backed artifact: a tensor."""

    kind = "toy_offsets"
    file_backed = True
    filename = "toy_offsets.safetensors"

    def __init__(self, offset, meta=None):
        super().__init__(meta)
        self.offset = offset

    def tensors(self):
        return {"offset": self.offset}

    @classmethod
    def from_payload(cls, payload, meta, tensors=None):
        if not tensors or "offset" not in tensors:
            raise ValueError("missing tensor 'offset'")
        if not torch.isfinite(tensors["offset"]).all():
            raise ValueError("tensor 'offset' contains NaN or Inf")
        return cls(tensors["offset"], meta)


class ToySolver(Solver):
    """DDIM plus bias = weight_i * offset (exercises both artifact kinds)."""

    name = "toy_artifacts"
    paper = "-"
    summary = "test solver"
    options = {"weights": Option(None, "per-step weights", kind="artifact", artifact=StepWeights),
               "offsets": Option(None, "offset tensor", kind="artifact", artifact=Offsets)}

    def plan(self, grid, prediction="epsilon"):
        w, o = self.config["weights"], self.config["offsets"]
        for artifact in (w, o):
            if artifact is not None:
                artifact.check(nfe=grid.n, schedule=grid.schedule, solver=self.name)
        t = empty_tables(grid, 1, prediction)
        for i in range(grid.n):
            g = StepGeometry.of(grid, i)
            t["predict"][i] = torch.tensor([g.sigma_t / g.sigma_s, -g.expm1_neg_h_alpha()], dtype=torch.float64)
        bias = None
        if w is not None and o is not None:
            bias = torch.tensor(w.weights, dtype=torch.float64)[:, None] * o.offset.double()[None]
        return SolverPlan(grid, "data", 1, t["x0_coef"], t["predict"], predict_bias=bias, orders=[1] * grid.n)


@pytest.fixture
def toy_solver():
    registry.register_solver(ToySolver)
    yield ToySolver
    registry._REGISTRY.pop(ToySolver.name)


LINEAR = fewstep.make_schedule("linear").to_dict()


def test_inline_round_trip_json_and_yaml(tmp_path):
    a = StepWeights([1.0, 2.0, 3.5], ArtifactMeta(nfe=3, schedule=LINEAR, guidance=7.5, solver="x", extra={"k": 1}))
    for name in ("w.json", "w.yaml"):
        b = StepWeights.load(a.save(tmp_path / name))
        assert b == a and b.weights == a.weights and b.meta == a.meta
    assert StepWeights.coerce(a.to_config(), "weights") == a
    record = json.loads((tmp_path / "w.json").read_text())
    assert record["fewstep_artifact"] == "toy_step_weights" and record["version"] == 1


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.update(fewstep_artifact="dc_ratios"), "not a toy_step_weights artifact"),
    (lambda r: r.update(version=99), "format version 99 is newer"),
    (lambda r: r.update(version="1"), "version='1' is not a format version"),
    (lambda r: r.update(weights="abc"), "weights must be a list of numbers"),
    (lambda r: r["meta"].update(nfe=-2), "meta.nfe=-2"),
    (lambda r: r["meta"].update(bogus=1), r"unknown meta field\(s\) \['bogus'\]"),
])
def test_malformed_records_are_rejected_naming_file_and_field(tmp_path, mutate, match):
    record = StepWeights([1.0], ArtifactMeta(nfe=1)).to_dict()
    mutate(record)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=f"toy_step_weights artifact {path}: .*{match}"):
        StepWeights.load(path)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        StepWeights.load(tmp_path / "x.json")
    with pytest.raises(ArtifactError, match="no such file"):
        StepWeights.load(tmp_path / "missing.json")
    (tmp_path / "o.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="toy_offsets artifact .*o.safetensors"):
        Offsets.load(tmp_path / "o.safetensors")
    with pytest.raises(TypeError, match="must be a StepWeights, a path to one, or its config entry"):
        StepWeights.coerce(3.0)


def test_file_backed_round_trip_and_validation(tmp_path):
    a = Offsets(torch.arange(4.0), ArtifactMeta(schedule=LINEAR))
    b = Offsets.load(a.save(tmp_path / "o.safetensors"))
    assert torch.equal(b.offset, a.offset) and b == a
    bad = Offsets(torch.tensor([1.0, float("nan")]))
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(ArtifactError, match="contains NaN or Inf"):
        Offsets.load(tmp_path / "nan.safetensors")


def test_check_names_nfe_schedule_and_solver_mismatches():
    a = StepWeights([1.0] * 5, ArtifactMeta(nfe=5, schedule=LINEAR, solver="dc"))
    a.check(nfe=5, schedule=fewstep.make_schedule("linear"), solver="dc")
    with pytest.raises(ArtifactError, match="made for NFE 5, but this grid has 6 steps"):
        a.check(nfe=6)
    with pytest.raises(ArtifactError, match="another noise schedule \\(beta_end: 0.02 \\(artifact\\) vs 0.012"):
        a.check(schedule=fewstep.make_schedule("scaled_linear"))
    with pytest.raises(ArtifactError, match="belongs to solver 'dc', not 'unipc'"):
        a.check(solver="unipc")


def test_model_fingerprint_tracks_weights_not_dtype():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    same = model_fingerprint(torch.nn.Sequential(*[m for m in net]))
    half = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    half.load_state_dict(net.state_dict())
    half = half.to(torch.bfloat16)
    tuned = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    assert model_fingerprint(net) == same == model_fingerprint(half)
    assert model_fingerprint(tuned) != model_fingerprint(net)
    assert model_fingerprint(lambda x, t: x) is None
    mix = GaussianMixture.random(4, 3, seed=0)
    assert model_fingerprint(GMMModel(mix)) == model_fingerprint(GMMModel(mix)) != model_fingerprint(
        GMMModel(GaussianMixture.random(4, 3, seed=1)))


def test_functional_api_checks_artifacts(toy_solver):
    model = GMMModel(GaussianMixture.random(4, 3, seed=0))
    x = torch.randn(2, 4, dtype=torch.float64)
    w = StepWeights([0.0, 0.5, 1.0], ArtifactMeta(nfe=3, schedule=LINEAR, fingerprint="gmm:other"))
    o = Offsets(torch.ones(4, dtype=torch.float64))
    with pytest.warns(UserWarning, match="tuned on model gmm:other"):
        y = fewstep.sample(model, x, solver="toy_artifacts", nfe=3, weights=w, offsets=o)
    base = fewstep.sample(model, x, solver="ddim", nfe=3, spacing=fewstep.GridSpec(convention="multistep"))
    assert float((y - base).abs().max()) > 0.1
    with pytest.raises(ArtifactError, match="made for NFE 3, but this grid has 4 steps"):
        fewstep.sample(model, x, solver="toy_artifacts", nfe=4, weights=w, offsets=o)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = StepWeights([0.0, 0.5, 1.0], ArtifactMeta(nfe=3, fingerprint=model.fingerprint()))
        fewstep.sample(model, x, solver="toy_artifacts", nfe=3, weights=ok, offsets=o)


def test_scheduler_carries_inline_and_file_artifacts_through_save_pretrained(tmp_path, toy_solver):
    w = StepWeights([0.0, 0.2, 0.4, 1.0], ArtifactMeta(nfe=4))
    o = Offsets(torch.linspace(-1, 1, 3))
    s = FewstepScheduler.from_config({}, solver="toy_artifacts", weights=w, offsets=o)
    s.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())["solver_options"]
    assert saved["weights"]["weights"] == [0.0, 0.2, 0.4, 1.0]  # inline
    assert saved["offsets"]["file"] == "toy_offsets.safetensors"  # a reference: the tensor is in the file
    assert (tmp_path / "toy_offsets.safetensors").is_file()
    loaded = FewstepScheduler.from_pretrained(tmp_path)
    assert loaded.solver.config == s.solver.config

    def run(sched):
        sched.set_timesteps(4)
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
        for t in sched.timesteps:
            x = sched.step(torch.tanh(x), t, x).prev_sample
        return x

    torch.testing.assert_close(run(loaded), run(s), rtol=0, atol=0)
    # An in-memory config round trip finds the file-backed artifact by its hash.
    assert FewstepScheduler.from_config(s.config).solver.config["offsets"] == o
    # A different file under the referenced name is refused, as is a missing one.
    Offsets(torch.zeros(3)).save(tmp_path / "toy_offsets.safetensors")
    with pytest.raises(ValueError, match="is not the one the config names"):
        FewstepScheduler.from_pretrained(tmp_path)
    (tmp_path / "toy_offsets.safetensors").unlink()
    del o, s, loaded  # nothing keeps the artifact alive in memory any more
    import gc

    gc.collect()
    with pytest.raises(ValueError, match="toy_offsets.safetensors .* not found"):
        FewstepScheduler.from_pretrained(tmp_path)
