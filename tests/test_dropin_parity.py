"""Drop-in parity with diffusers' schedulers at the edges a pipeline reaches (issue 16).

Each test names the diffusers behaviour it checks; the pipeline-level matrix is
tests/test_pipelines_matrix.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fewstep
from fewstep import (
    DDIMSolverScheduler,
    DPMSolverPPScheduler,
    FewstepScheduler,
    UniPCScheduler,
    USFScheduler,
)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- item 0: reload in a fresh process
def test_saved_pipelines_reload_in_a_fresh_interpreter(tmp_path):
    from fewstep.zoo.digits import load_digits_pipeline
    from fewstep.zoo.tiny import build_tiny_sd_pipeline

    sd = build_tiny_sd_pipeline()
    sd.scheduler = UniPCScheduler.from_config(sd.scheduler.config, order=3)
    sd.save_pretrained(tmp_path / "sd")
    digits = load_digits_pipeline(DPMSolverPPScheduler)
    digits.save_pretrained(tmp_path / "digits")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["scheduler"][0].startswith("fewstep")
    # The README's round trip, as a new user runs it: nothing but `import fewstep` first.
    script = textwrap.dedent(f"""
        import sys
        import fewstep
        assert "diffusers" not in sys.modules, "import fewstep must stay light"
        from diffusers import DiffusionPipeline
        sd = DiffusionPipeline.from_pretrained({str(tmp_path / "sd")!r})
        print(type(sd.scheduler).__name__, sd.scheduler.solver.config["order"])
        from fewstep.zoo.digits import DigitsPipeline
        digits = DigitsPipeline.from_pretrained({str(tmp_path / "digits")!r})
        print(type(digits.scheduler).__name__)
        assert type(sd.scheduler) is fewstep.UniPCScheduler
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["UniPCScheduler", "3", "DPMSolverPPScheduler"]
