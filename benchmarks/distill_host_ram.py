"""Peak host RAM of AGD training on the digits recipe vs the size of the trajectory collection.

Writes two valid digits collections (manifest + shards with the collection identity) of random
float32 states, 1x and 4x the shards, trains a few steps on each in a fresh process, and reads
that process's peak RSS (``ru_maxrss``). Training reads each batch's rows from the shard files,
so the peak must not grow with the collection; loading the collection (as fewstep did before)
would add its size (and a concatenation copy) to the peak.

    python benchmarks/distill_host_ram.py [--base-shards 4] [--rows 32768]
Writes benchmarks/results/distill_host_ram.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

_CHILD = """
import resource, sys
from fewstep.config import load_config
from fewstep.distill.settings import DistillConfig
from fewstep.distill.train import train
train(load_config(DistillConfig, sys.argv[1], overrides=sys.argv[2:]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_collection(folder: Path, overrides: list[str]) -> int:
    """A valid collection for the digits config with ``overrides``, of random states; returns its bytes on disk."""
    import torch
    from safetensors.torch import save_file

    from fewstep.config import load_config
    from fewstep.distill.settings import DistillConfig
    from fewstep.distill.trajectories import (
        FORMAT, FORMAT_VERSION, LabelTeacher, _scheduler_identity, build_scheduler, collection_id,
    )
    from fewstep.zoo.digits import NULL_LABEL, NUM_CLASSES, load_digits_pipeline

    cfg = load_config(DistillConfig, ROOT / "configs/distill/digits.yaml", overrides=overrides)
    pipe = load_digits_pipeline()
    spec, num_shards = cfg.trajectory_spec(), cfg.num_shards
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "spec": spec.identity(),
                "teacher": LabelTeacher(pipe.unet, NUM_CLASSES, NULL_LABEL).describe(),
                "scheduler": _scheduler_identity(build_scheduler(cfg.teacher_scheduler, pipe.scheduler.config))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trajectories.json").write_text(json.dumps(manifest, indent=2) + "\n")
    n, g, total = spec.rows_per_shard, torch.Generator().manual_seed(0), 0
    for i in range(num_shards):
        shard = {"x": torch.randn(n, 1, 8, 8, generator=g), "target": torch.randn(n, 1, 8, 8, generator=g),
                 "t": torch.full((n,), 500.0), "cond": torch.randint(10, (n,), generator=g), "w": torch.ones(n)}
        meta = {"fewstep": json.dumps({"format": FORMAT, "collection": collection_id(manifest), "index": i},
                                      sort_keys=True)}
        path = folder / f"shard-{i:05d}.safetensors"
        save_file(shard, str(path), metadata=meta)
        total += path.stat().st_size
    return total


def peak_rss(work: Path, num_shards: int, shard_size: int, steps: int) -> dict[str, int]:
    """Collection bytes and the training process's peak RSS (bytes) for ``num_shards`` shards."""
    traj = work / f"traj-{num_shards}"
    overrides = [f"output_dir={work / f'run-{num_shards}'}", f"trajectory_dir={traj}", f"num_shards={num_shards}",
                 f"shard_size={shard_size}", f"trajectory_steps={steps}", "trajectory_dtype=float32", "max_steps=3",
                 "batch_size=64", "checkpointing_steps=0", "validation_steps=0", "report_to=none", "progress=false",
                 "warmup_steps=0"]
    size = write_collection(traj, overrides)
    args = [str(ROOT / "configs/distill/digits.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return {"shards": num_shards, "collection_bytes": size, "peak_rss_bytes": int(run.stdout.split()[-1]) * 1024}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-shards", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=8192, help="trajectories per shard")
    p.add_argument("--steps", type=int, default=4, help="states per trajectory")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--out", default=str(RESULTS / "distill_host_ram.json"))
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = [peak_rss(work, k * args.base_shards, args.shard_size, args.steps) for k in (1, 4)]
    result = {"rows": rows, "peak_ratio_4x_over_1x": rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"],
              "collection_growth_over_1x_peak": (rows[1]["collection_bytes"] - rows[0]["collection_bytes"])
              / rows[0]["peak_rss_bytes"],
              "command": "python benchmarks/distill_host_ram.py " + " ".join(argv or sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['shards']:3d} shards, collection {r['collection_bytes'] / 2**20:7.1f} MiB: "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB")
    print(f"peak 4x / 1x = {result['peak_ratio_4x_over_1x']:.3f} (the extra collection is "
          f"{result['collection_growth_over_1x_peak']:.0%} of the 1x peak)")
    return result


if __name__ == "__main__":
    main()
