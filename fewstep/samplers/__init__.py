"""The solver core: schedules, grids, conversion, solvers, the functional loop and the diffusers adapter."""

from .artifacts import Artifact, ArtifactError, ArtifactMeta, model_fingerprint
from .ems import EMS
from .plan import PlanExecutor, SolverPlan
from .prediction import PREDICTIONS, Clip, DynamicThreshold, cfg_combine
from .registry import get_solver, list_solvers, register_solver, solver_class
from .schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    FlowSchedule,
    NoiseSchedule,
    VESchedule,
    make_schedule,
)
from .solver_schedule import SolverSchedule, StepStrategy, load_solver_schedule
from .solvers import dc, ddim, dpmpp, dpmv3, unipc, usf  # noqa: F401  (registers the solvers)
from .solvers.base import Option, Solver
from .sampling import StepInfo, make_plan, sample
from .dc_artifacts import DCCPR, DCRatios, fit_cpr
from .timeshift import TimeShift
from .timeshift_hook import time_shift
from .timesteps import SPACINGS, GridSpec, TimeGrid, build_grid

__all__ = [
    "Artifact", "ArtifactError", "ArtifactMeta", "model_fingerprint", "EMS",
    "Clip", "ContinuousVPSchedule", "DiscreteVPSchedule", "DynamicThreshold", "FlowSchedule", "GridSpec",
    "NoiseSchedule", "Option", "PREDICTIONS", "PlanExecutor", "SPACINGS", "Solver", "SolverPlan", "SolverSchedule",
    "StepInfo", "StepStrategy", "TimeGrid", "VESchedule", "build_grid", "cfg_combine", "get_solver", "list_solvers",
    "load_solver_schedule", "make_plan", "make_schedule", "register_solver", "sample", "solver_class",
    "DCRatios", "DCCPR", "fit_cpr", "TimeShift", "time_shift",
]
