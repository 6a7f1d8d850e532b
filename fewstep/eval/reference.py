"""Reference samples of ``fewstep compare``: found in the run folder or the cache, else computed in chunks.

A reference is stored with the identity of the configuration that made it; a file is used
only when that identity, its shape and its finiteness check out, so a stale, foreign or
NaN file is recomputed, never reused. While it is computed, the finished chunks are kept
in the run folder (``reference.partial.safetensors``), so an interrupted run resumes
after them. The finished reference is kept in the run folder and, when the cache is
writable, in the cache (an unwritable cache costs a warning, not the reference). The same
store keeps the references of ``fewstep search`` and ``fewstep calibrate dc``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fewstep.infra.io import cache_folder, load_tensors, save_tensors

__all__ = ["ReferenceStore", "default_cache_dir", "timed"]


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The reference-sample cache: ``<cache_dir>/references`` (None: ``$FEWSTEP_CACHE``, else ``~/.cache/fewstep``)."""
    return cache_folder("references", cache_dir)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), wall seconds)``, waiting for the device's queued work before stopping the clock."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


class ReferenceStore:
    """Where the reference of one configuration lives: the run folder, the cache, or a computation.

    Args:
        identity: Everything that determines the reference (JSON-serialisable).
        name: Short name for the cache file (the model's).
        out: Run folder.
        cache: Cache folder; None keeps the reference in the run folder only.
        log: Where messages go.
        stem: File name of the run folder's copy, without suffix (a run folder holding several
            references, such as ``fewstep calibrate dc``'s one per guidance, names each).
    """

    def __init__(self, identity: dict[str, Any], name: str, out: Path, cache: Path | None,
                 log: Callable[[str], None], *, stem: str = "reference"):
        self.identity = json.dumps(identity, sort_keys=True)
        slug = "".join(c if c.isalnum() else "_" for c in name) or "model"
        digest = hashlib.sha256(self.identity.encode()).hexdigest()[:20]
        self.run_copy = out / f"{stem}.safetensors"
        self.partial = out / f"{stem}.partial.safetensors"
        self.cached = None if cache is None else cache / f"{slug}-{digest}.safetensors"
        self.log = log
        self.wrote_run_copy = False

    def _read(self, path: Path, shape: torch.Size, partial: bool = False) -> tuple[torch.Tensor, float] | None:
        """(samples, seconds) if ``path`` holds a usable reference for this configuration."""
        if not path.exists():
            return None
        try:
            tensors, meta = load_tensors(path, with_metadata=True)
            samples = tensors.get("samples")
            if meta.get("identity") != self.identity:
                problem = "it was made for another configuration"
            elif samples is None:
                problem = "it holds no 'samples'"
            elif (samples.shape[1:] != shape[1:] or samples.shape[0] > shape[0]) if partial else samples.shape != shape:
                problem = f"its shape {tuple(samples.shape)} does not match {tuple(shape)}"
            elif not bool(torch.isfinite(samples).all()):
                problem = "it contains NaN or Inf"
            else:
                return samples, float(meta.get("time_s", "nan"))
        except (OSError, ValueError) as exc:
            problem = str(exc)
        self.log(f"reference: ignoring {path}: {problem}")
        return None

    def _save(self, path: Path, samples: torch.Tensor, seconds: float) -> None:
        save_tensors(path, {"samples": samples}, {"identity": self.identity, "time_s": repr(seconds)})
        self.wrote_run_copy |= path == self.run_copy

    def get(self, x_T: torch.Tensor, compute: Callable[[slice], torch.Tensor], batch_size: int, description: str,
            device: torch.device = torch.device("cpu"), progress: bool = True) -> tuple[torch.Tensor, float]:
        """The reference for ``x_T`` and the seconds its computation took.

        Args:
            x_T: The initial noise (fixes the shape).
            compute: Reference samples for the samples ``x_T[chunk]``.
            batch_size: Samples per chunk (part of the identity: it can change the last bits).
            description: What the reference is, for messages.
            device: Where ``compute`` runs (for timing).
            progress: Show a progress bar.

        Raises:
            ValueError: the computed reference is not finite.
        """
        for path in (self.run_copy, self.cached):
            found = None if path is None else self._read(path, x_T.shape)
            if found is not None:
                if path == self.cached:
                    self.log(f"reference: cached {path}")
                    self._save(self.run_copy, *found)
                elif self.cached is not None and not self.cached.exists():  # killed between the two copies
                    self._save_in_cache(*found)
                self.partial.unlink(missing_ok=True)
                return found
        samples, seconds = self._compute(x_T, compute, batch_size, description, device, progress)
        self._save(self.run_copy, samples, seconds)
        self.partial.unlink(missing_ok=True)
        self._save_in_cache(samples, seconds)
        return samples, seconds

    def _save_in_cache(self, samples: torch.Tensor, seconds: float) -> None:
        if self.cached is None:
            return
        try:
            self._save(self.cached, samples, seconds)
        except OSError as exc:
            self.log(f"warning: the reference cache is not writable ({exc}); the reference is kept in {self.run_copy}")

    def _compute(self, x_T, compute, bs, description, device, progress) -> tuple[torch.Tensor, float]:
        n = x_T.shape[0]
        found = self._read(self.partial, x_T.shape, partial=True)
        samples, seconds = found if found is not None else (x_T[:0].float(), 0.0)
        done = samples.shape[0] // bs * bs
        samples = samples[:done]
        self.log(f"reference: {description}" + (f", resuming after {done} finished samples" if done else ""))
        from tqdm.auto import tqdm

        with tqdm(total=n, initial=done, desc="reference", unit="sample", disable=not progress) as bar:
            for start in range(done, n, bs):
                try:
                    chunk, dt = timed(lambda: compute(slice(start, start + bs)), device)
                except FloatingPointError as exc:
                    raise ValueError(f"the reference ({description}) diverged: {exc}; check the model weights "
                                     "and the guidance") from None
                if not bool(torch.isfinite(chunk).all()):
                    raise ValueError(f"the reference ({description}) is not finite; check the model weights and "
                                     "the guidance")
                samples, seconds = torch.cat([samples, chunk.float()]), seconds + dt
                if samples.shape[0] < n:  # finished chunks survive a crash
                    self._save(self.partial, samples, seconds)
                bar.update(chunk.shape[0])
        return samples, seconds
