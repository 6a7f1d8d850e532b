"""Shared pieces of the DC-Solver and Time-Shift benchmarks: references, evaluation, a resumable store.

Evaluation follows ``fewstep compare``: samples i = 0..N-1 use noise seed i, every solver
runs on the model's common grid, MSE to the reference is the mean over samples of
||x - x_ref||^2 / D with the same noise, the reference is third-order DPM-Solver++
(``third_order="taylor"``) with 200 steps (the GMM: its exact ODE solution). Calibration
uses seeds >= 100000 (``fewstep calibrate dc``'s default), disjoint from the evaluation seeds.
Every finished unit (a calibration, an evaluated method) is written to the results JSON at
once, so an interrupted script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

import fewstep
from fewstep.tuning.dc.command import calibration_inputs
from fewstep.infra.io import load_tensors, read_json, save_tensors, write_json
from fewstep.eval.testbeds import Testbed

REFERENCE = ("dpmpp", {"order": 3, "third_order": "taylor"}, 200)
CALIBRATION_SEED = 100_000
ROOT = Path(__file__).resolve().parent


class Bench:
    """One testbed, its evaluation noise and references, and a results file that fills up unit by unit."""

    @classmethod
    def from_command_line(cls, doc: str, testbed: Callable[[], Testbed], name: str, folder: str = "dc",
                          eval_samples: int = 500, switches: dict[str, str] | None = None) -> "Bench":
        """Parse ``--eval-samples`` (and the boolean ``switches``, name -> help, kept in
        ``bench.switches``), pin torch to one thread, and build the bench."""
        p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--eval-samples", type=int, default=eval_samples, help=f"default: {eval_samples}")
        for flag, text in (switches or {}).items():
            p.add_argument(f"--{flag}", action="store_true", help=text)
        args = p.parse_args()
        torch.set_num_threads(1)
        bench = cls(testbed(), name, args.eval_samples, folder)
        bench.switches = {flag: getattr(args, flag.replace("-", "_")) for flag in (switches or {})}
        return bench

    def __init__(self, testbed: Testbed, name: str, num_eval: int, folder: str = "dc",
                 log: Callable[[str], None] = print):
        self.tb, self.name, self.n, self.log = testbed, name, num_eval, log
        self.results_dir = ROOT / "results" / folder
        self.artifacts = self.results_dir / name
        self.work = ROOT.parent / "runs" / "dc-bench" / testbed.name  # references are shared by the scripts
        self.path = self.results_dir / f"{name}.json"
        self.store: dict[str, Any] = read_json(self.path) if self.path.exists() else {}
        if self.store.get("num_eval", num_eval) != num_eval:
            raise SystemExit(f"{self.path} holds results for {self.store['num_eval']} evaluation samples; "
                             f"delete it or pass --eval-samples {self.store['num_eval']}")
        self.store["num_eval"] = num_eval
        self.x, self.cond = testbed.initial_noise(num_eval, 0)
        self._refs: dict[float, torch.Tensor] = {}

    def unit(self, key: str, compute: Callable[[], Any]) -> Any:
        """The stored value of ``key``, computed and saved first if missing."""
        if key not in self.store:
            start = time.perf_counter()
            value = compute()
            self.log(f"{self.name}: {key} ({time.perf_counter() - start:.0f} s)")
            self.store[key] = value
            write_json(self.path, self.store)
        return self.store[key]

    def reference(self, guidance: float) -> torch.Tensor:
        if guidance not in self._refs:
            path = self.work / f"reference-g{guidance:g}-n{self.n}.safetensors"
            if path.exists():
                self._refs[guidance] = load_tensors(path)["x"]
            else:
                solver, options, nfe = REFERENCE
                ref = self._chunks(lambda x, c: self.tb.reference(x, c, guidance, None, solver, options, nfe),
                                   partial=path.with_suffix(".partial.safetensors"))
                save_tensors(path, {"x": ref})
                path.with_suffix(".partial.safetensors").unlink(missing_ok=True)
                self._refs[guidance] = ref
        return self._refs[guidance]

    def _chunks(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], partial: Path | None = None
                ) -> torch.Tensor:
        """``fn`` over batches; with ``partial``, finished batches are kept there and reused after a crash."""
        bs = self.tb.batch_size
        done = [load_tensors(partial)["x"]] if partial is not None and partial.exists() else []
        for i in range(sum(len(d) for d in done), self.n, bs):
            done.append(fn(self.x[i:i + bs], self.cond[i:i + bs]).float().cpu())
            if partial is not None:
                save_tensors(partial, {"x": torch.cat(done)})
        return torch.cat(done)

    def samples(self, solver: str, options: dict[str, Any], nfe: int, guidance: float) -> torch.Tensor:
        return self._chunks(lambda x, c: self.tb.generate(solver, options, nfe, x, c, guidance, None))

    def evaluate(self, solver: str, options: dict[str, Any], nfe: int, guidance: float, key: str | None = None
                 ) -> dict[str, float]:
        """MSE to the reference (mean and standard error over samples) and the testbed's metrics.

        With ``key`` the per-sample errors are kept (see :meth:`errors`) for paired comparisons.
        """
        x = self.samples(solver, options, nfe, guidance)
        err = (x - self.reference(guidance)).pow(2).flatten(1).mean(1).double()
        if key is not None:
            save_tensors(self._errors_path(key), {"err": err})
        top = err.sort(descending=True).values[: max(1, len(err) // 100)]
        return {"mse": err.mean().item(), "mse_se": (err.std() / math.sqrt(len(err))).item(),
                "mse_median": err.median().item(), "mse_top1pct_share": (top.sum() / err.sum()).item(),
                **self.tb.evaluate(x, self.cond)}

    def _errors_path(self, key: str) -> Path:
        return self.work / "errors" / (key.replace("/", "_") + f"-n{self.n}.safetensors")

    def errors(self, key: str) -> torch.Tensor:
        """Per-sample errors ||x - x_ref||^2 / D of an evaluated unit."""
        return load_tensors(self._errors_path(key))["err"]

    def calibrate(self, nfe: int, guidance: float, *, num_samples: int = 10, seed: int = CALIBRATION_SEED,
                  solver: str = "dc", exact_targets: bool = False, **options: Any) -> fewstep.DCRatios:
        """DC ratios for one pair, from ``fewstep.calibrate_dc`` with its defaults; kept as a file.

        ``exact_targets``: calibrate against the testbed's reference (the GMM's exact ODE
        solution) instead of calibrate_dc's default 200-step DDIM.
        """
        tag = f"{solver}-nfe{nfe}-g{guidance:g}-n{num_samples}-s{seed}" + ("-exact" if exact_targets else "")
        path = self.artifacts / f"ratios-{tag}.json"
        if path.exists():
            return fewstep.DCRatios.load(path)
        inputs = calibration_inputs(self.tb, guidance, num_samples, seed, None)
        if exact_targets:
            x, labels = self.tb.initial_noise(num_samples, seed)
            options["reference"] = self.tb.reference(x, labels, guidance, None, *REFERENCE)
        start = time.perf_counter()
        options.setdefault("objective", "final")  # the objective these benchmarks' committed ratios were made with
        ratios = fewstep.calibrate_dc(**inputs, nfe=nfe, solver=solver, checkpoint=self.work / f"state-{tag}.json",
                                      **options)
        ratios.meta.extra.update(seed=seed, seconds=round(time.perf_counter() - start, 1), threads=1)
        self.log(f"{self.name}: calibrated {tag} in {ratios.meta.extra['seconds']:.0f} s: "
                 f"{[round(r, 3) for r in ratios.ratios]}")
        return fewstep.DCRatios.load(ratios.save(path))


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"
