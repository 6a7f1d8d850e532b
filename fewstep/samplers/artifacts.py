"""Tuned artifacts: the one file pattern behind DC ratios, EMS statistics and solver schedules.

An artifact is a small, versioned record a solver reads when it builds its plan:

* a ``kind`` and a format ``version``;
* :class:`ArtifactMeta`: the fingerprint of the model it was tuned on, the noise schedule,
  the NFE / guidance it was made for, the solver, and free-form provenance;
* a payload (a few floats, or tensors for the file-backed EMS).

Small artifacts live *inline*: the whole record is JSON in the scheduler config, so
``save_pretrained`` / ``from_pretrained`` carry it. Large ones (DPM-Solver-v3's EMS) are
*file-backed*: a safetensors file with the record as a JSON header, written next to the
scheduler config by ``save_pretrained``; the config holds ``{"file": NAME, "sha256": ...}``,
NAME a plain file name beside the config (no folder, ``..`` or absolute path), its content
checked against the sha256 when ``from_pretrained`` loads it. A config without its folder
(an in-memory round trip) is served only by this process's copy of that content, never by
a file found relative to the working directory.

Every way in goes through :meth:`Artifact.coerce` (an instance, a path, a config entry),
which validates the payload (shape, finiteness, ranges) and names the file and the field
on error. Solvers check the NFE and schedule against the grid with :meth:`Artifact.check`;
the run's guidance and grid are checked at its first step (:mod:`.artifact_checks`);
the model fingerprint (seen by the functional API, and by a scheduler inside a pipeline) is
compared by :meth:`Artifact.check_model` (a warning: applying an artifact to a fine-tune is legitimate).

A solver declares an artifact option as ``Option(None, "...", kind="artifact", artifact=MyArtifact)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, TypeVar

import torch

from fewstep.infra.io import atomic_write_bytes, load_tensors, save_tensors
from fewstep.infra.validation import check_int, check_real

__all__ = [
    "Artifact",
    "ArtifactMeta",
    "ArtifactError",
    "FileReference",
    "is_file_reference",
    "check_file_reference",
    "resolve_file_reference",
    "ArtifactModelWarning",
    "model_fingerprint",
    "schedule_mismatch",
    "ARTIFACT_FORMAT",
]

ARTIFACT_FORMAT = "fewstep_artifact"
A = TypeVar("A", bound="Artifact")

# File-backed artifacts loaded in this process, by content hash: a config round trip in
# memory (``X.from_config(sched.config)``) finds them without the file.
_LOADED: "weakref.WeakValueDictionary[str, Artifact]" = weakref.WeakValueDictionary()
# A config names a file-backed artifact by a plain file name beside the config (what
# save_pretrained writes): no folders, no "..", no absolute paths.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _remember(artifact: "Artifact") -> str:
    """Register a file-backed artifact by content hash; an entry still alive is kept (not replaced by
    a later copy that may be dropped first)."""
    digest = artifact.sha256()
    if _LOADED.get(digest) is None:
        _LOADED[digest] = artifact
    return digest


def is_file_reference(value: Any) -> bool:
    """Whether a config entry is a file reference ``{"file": NAME, "sha256": HEX}`` (not an inline record)."""
    return isinstance(value, Mapping) and "file" in value and set(value) <= {"file", "sha256"}


def check_file_reference(ref: Mapping[str, Any], what: str = "artifact") -> tuple[str, str]:
    """(name, sha256) of a config's file reference, validated.

    Raises:
        ArtifactError: a name that is not a plain file name beside the config (absolute, ``..``,
            a folder), or a missing/malformed sha256.
    """
    name, digest = ref.get("file"), ref.get("sha256")
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or set(name) == {"."}:
        raise ArtifactError(f"{what} names the file {name!r}: a config may only reference a file beside it by a "
                            "plain name (no folders, no '..', no absolute path)")
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise ArtifactError(f"{what} references {name!r} without a valid sha256 (got {digest!r}); a config must "
                            "name the content of the file it references")
    return name, digest


@dataclasses.dataclass(frozen=True)
class FileReference:
    """A config's file reference resolved against the folder the config was loaded from.

    Attributes:
        name: The file name in the config.
        sha256: The content hash the config names (checked on load).
        path: Where the file is (the config's folder, or the hub cache).
    """

    name: str
    sha256: str
    path: str


def resolve_file_reference(ref: Mapping[str, Any], locate: "Callable[[str], str]",
                           what: str = "artifact") -> FileReference:
    """Validate a config's ``{"file", "sha256"}`` entry and locate the file with ``locate(name)``."""
    name, digest = check_file_reference(ref, what)
    return FileReference(name, digest, locate(name))


class ArtifactError(ValueError):
    """A malformed, mismatched or missing artifact (a ValueError naming the file and field)."""


def _version() -> str:
    from fewstep._version import __version__

    return __version__


@dataclasses.dataclass(frozen=True)
class ArtifactMeta:
    """Where an artifact comes from and what it is valid for.

    Attributes:
        fingerprint: :func:`model_fingerprint` of the model it was tuned on (None: unknown).
        schedule: The noise schedule's ``to_dict()`` (None: any).
        nfe: Number of model evaluations it was made for (None: any).
        guidance: Classifier-free guidance scale it was made for (None: unguided / any).
        solver: The solver it belongs to (None: any).
        created_with: fewstep version that wrote it.
        extra: Free-form provenance (command line, sample counts, seeds, losses, ...).
    """

    fingerprint: str | None = None
    schedule: dict[str, Any] | None = None
    nfe: int | None = None
    guidance: float | None = None
    solver: str | None = None
    created_with: str = dataclasses.field(default_factory=_version)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nfe is not None:
            object.__setattr__(self, "nfe", check_int("meta.nfe", self.nfe, 1))
        if self.guidance is not None:
            object.__setattr__(self, "guidance", check_real("meta.guidance", self.guidance))
        for name in ("fingerprint", "solver", "created_with"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"meta.{name}={value!r} must be a string")
        for name in ("schedule", "extra"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"meta.{name} must be a mapping, got {type(value).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "ArtifactMeta":
        if not isinstance(d, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown meta field(s) {unknown}")
        return cls(**d)


def _numbers_close(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def schedule_mismatch(expected: Mapping[str, Any] | None, actual: Mapping[str, Any]) -> str | None:
    """The first field where two ``NoiseSchedule.to_dict()`` descriptions differ, or None."""
    if expected is None:
        return None
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key), actual.get(key)
        if isinstance(a, list) and isinstance(b, list):
            same = len(a) == len(b) and all(_numbers_close(x, y) for x, y in zip(a, b))
        else:
            same = _numbers_close(a, b)
        if not same:
            return f"{key}: {_short(a)} (artifact) vs {_short(b)} (here)"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


class ArtifactModelWarning(UserWarning):
    """A tuned artifact is used on another model than it was tuned on (the CLIs turn it into an error)."""


def model_fingerprint(model: Any) -> str | None:
    """A short id of a model's architecture and weights, independent of device and dtype.

    ``nn.Module``: the class, every parameter/buffer name and shape, and up to 64 evenly
    strided values per tensor rounded to bfloat16 (so float16/bfloat16/float32 copies of the
    same weights agree, and a fine-tune does not). Diffusers pipelines use their UNet or
    transformer; objects with a ``fingerprint()`` method (the analytic GMM) use it; a bound
    method (``testbed.model``) is fingerprinted by its object; anything else (a bare
    function) has none. Cached per module object.
    """
    if inspect.ismethod(model):  # e.g. DigitsTestbed.model: its object holds the network
        return model_fingerprint(model.__self__)
    denoiser = getattr(model, "unet", None) or getattr(model, "transformer", None)
    if denoiser is not None and not isinstance(model, torch.nn.Module):
        return model_fingerprint(denoiser)
    method = getattr(model, "fingerprint", None)
    if callable(method):
        return str(method())
    if not isinstance(model, torch.nn.Module):
        return None
    cached = _FINGERPRINTS.get(model)
    if cached is not None:
        return cached
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        if tensor.device.type != "meta" and tensor.numel() and tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()
            h.update(flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    digest = "module:" + h.hexdigest()[:20]
    _FINGERPRINTS[model] = digest
    return digest


class Artifact:
    """Base class of tuned artifacts; see the module docstring.

    Subclasses set ``kind`` (and ``file_backed``/``filename`` for file artifacts) and
    implement :meth:`payload` / :meth:`from_payload` (inline) or :meth:`tensors` /
    :meth:`from_tensors` (file-backed).
    """

    kind: ClassVar[str]
    version: ClassVar[int] = 1
    file_backed: ClassVar[bool] = False
    filename: ClassVar[str] = ""  # the name save_pretrained writes a file-backed artifact under

    def __init__(self, meta: ArtifactMeta | None = None):
        if meta is not None and not isinstance(meta, ArtifactMeta):
            raise TypeError(f"meta must be an ArtifactMeta, got {type(meta).__name__}")
        self.meta = meta or ArtifactMeta()

    # ---------------------------------------------------------------- subclass interface
    def payload(self) -> dict[str, Any]:
        """JSON-able content (inline artifacts; file-backed ones put small fields here too)."""
        return {}

    @classmethod
    def from_payload(cls: type[A], payload: dict[str, Any], meta: ArtifactMeta,
                     tensors: dict[str, torch.Tensor] | None = None) -> A:
        """Rebuild and validate; raise ValueError/TypeError naming the bad field."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor content of file-backed artifacts."""
        return {}

    # ---------------------------------------------------------------- records
    def to_dict(self) -> dict[str, Any]:
        """The full JSON record (without tensors)."""
        return {ARTIFACT_FORMAT: self.kind, "version": self.version, "meta": self.meta.to_dict(), **self.payload()}

    @classmethod
    def from_dict(cls: type[A], record: Any, source: str = "<inline>",
                  tensors: dict[str, torch.Tensor] | None = None) -> A:
        """Validate a record read from ``source`` (a file name or "<inline>")."""
        try:
            if not isinstance(record, Mapping):
                raise TypeError(f"expected a JSON object, got {type(record).__name__}")
            kind = record.get(ARTIFACT_FORMAT)
            if kind != cls.kind:
                raise ValueError(f"this is not a {cls.kind} artifact ({ARTIFACT_FORMAT}={kind!r})")
            version = record.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError(f"version={version!r} is not a format version")
            if version > cls.version:
                raise ValueError(f"format version {version} is newer than this fewstep reads ({cls.version}); "
                                 "upgrade fewstep")
            meta = ArtifactMeta.from_dict(record.get("meta", {}))
            payload = {k: v for k, v in record.items() if k not in (ARTIFACT_FORMAT, "version", "meta")}
            return cls.from_payload(payload, meta, tensors)
        except (TypeError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{cls.kind} artifact {source}: {exc}") from None

    # ---------------------------------------------------------------- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: JSON (``.json``), YAML (``.yaml``/``.yml``) or, for file-backed
        artifacts, safetensors with the record as JSON metadata."""
        path = Path(path)
        if self.file_backed:
            save_tensors(path, self.tensors(), metadata={ARTIFACT_FORMAT: json.dumps(self.to_dict())})
        elif path.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.create(self.to_dict())).encode())
        else:
            atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls: type[A], path: str | os.PathLike) -> A:
        """Read and validate a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{cls.kind} artifact {path}: no such file")
        if cls.file_backed:
            try:
                tensors, metadata = load_tensors(path, with_metadata=True)
            except (OSError, ValueError) as exc:
                raise ArtifactError(f"{cls.kind} artifact {path}: {exc}") from None
            header = metadata.get(ARTIFACT_FORMAT)
            if header is None:
                raise ArtifactError(f"{cls.kind} artifact {path}: no {ARTIFACT_FORMAT} header")
            record = _parse_json(header, path, cls.kind)
            artifact = cls.from_dict(record, str(path), tensors)
            _remember(artifact)
            return artifact
        text = _read_text(path, cls.kind)
        if path.suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            try:
                record = OmegaConf.to_container(OmegaConf.create(text))
            except Exception as exc:  # omegaconf/yaml raise several parser error types
                raise ArtifactError(f"{cls.kind} artifact {path}: not valid YAML ({exc})") from None
        else:
            record = _parse_json(text, path, cls.kind)
        return cls.from_dict(record, str(path))

    def sha256(self) -> str:
        """Content hash (tensors and record), the identity of file-backed artifacts."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    # ---------------------------------------------------------------- config entries
    def to_config(self) -> dict[str, Any]:
        """What a scheduler config stores: the record inline, or a reference to the file."""
        if self.file_backed:
            return {"file": self.filename, "sha256": _remember(self)}
        return self.to_dict()

    @classmethod
    def coerce(cls: type[A], value: Any, what: str = "artifact") -> A:
        """An artifact from an instance, a path, or a config entry (inline record / file reference).

        Raises:
            ArtifactError: for unreadable, malformed or missing artifacts (naming ``what``).
            TypeError: for values of another kind.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, FileReference):
            return cls._from_reference(value.name, value.sha256, what, Path(value.path))
        if isinstance(value, Mapping):
            if is_file_reference(value):
                # A config without its folder (an in-memory round trip): only this process's copy
                # of that content will do, never a file found relative to the working directory.
                return cls._from_reference(*check_file_reference(value, what), what, None)
            return cls.from_dict(value, f"given as {what}")
        raise TypeError(f"{what} must be a {cls.__name__}, a path to one, or its config entry; "
                        f"got {type(value).__name__}")

    @classmethod
    def _from_reference(cls: type[A], name: str, digest: str, what: str, path: Path | None) -> A:
        if path is not None and path.is_file():
            artifact = cls.load(path)
            if artifact.sha256() != digest:
                raise ArtifactError(f"{cls.kind} artifact {path}: its content (sha256 {artifact.sha256()[:12]}) is not "
                                    f"the one the config names (sha256 {digest[:12]})")
            return artifact
        known = _LOADED.get(digest)
        if isinstance(known, cls):
            return known
        raise ArtifactError(
            f"{cls.kind} artifact {path or name} (named by {what}) not found; load the scheduler with from_pretrained "
            f"from the folder that holds it, or pass {what}=PATH"
        )

    def relabel(self: A, **changes: Any) -> A:
        """A copy whose meta claims other uses (e.g. ``guidance=7.5``): a deliberate override of the checks.

        The values it replaces are kept in ``meta.extra["relabelled"]`` (e.g. an ablation running
        the unguided model's EMS in guided sampling).
        """
        old = self.meta.to_dict()
        unknown = sorted(set(changes) - set(old) - {"extra"}) or sorted(set(changes) & {"extra", "created_with"})
        if unknown:
            raise ValueError(f"relabel takes meta fields other than extra/created_with, got {unknown}")
        extra = {**old["extra"], "relabelled": {k: old[k] for k in changes}}
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.meta = ArtifactMeta(**{**old, **changes, "extra": extra})
        return copy

    # ---------------------------------------------------------------- validation against use
    def check(self, *, nfe: int | None = None, schedule: Any = None, solver: str | None = None) -> None:
        """Raise ArtifactError when the artifact was made for another NFE, schedule or solver."""
        meta = self.meta
        if nfe is not None and meta.nfe is not None and meta.nfe != nfe:
            raise ArtifactError(f"{self.kind} artifact was made for NFE {meta.nfe}, but this grid has {nfe} steps")
        if solver is not None and meta.solver is not None and meta.solver != solver:
            raise ArtifactError(f"{self.kind} artifact belongs to solver {meta.solver!r}, not {solver!r}")
        if schedule is not None:
            diff = schedule_mismatch(meta.schedule, schedule.to_dict() if hasattr(schedule, "to_dict") else schedule)
            if diff is not None:
                raise ArtifactError(f"{self.kind} artifact was made for another noise schedule ({diff})")

    def check_model(self, model: Any, stacklevel: int = 2) -> None:
        """Warn (:class:`ArtifactModelWarning`; the CLIs make it an error) when the model's fingerprint
        differs from the one the artifact was tuned on.

        Args:
            model: The model (module, pipeline, or object with ``fingerprint()``).
            stacklevel: Frames above the caller to attribute the warning to (1: the caller).
        """
        if self.meta.fingerprint is None:
            return
        actual = model_fingerprint(model)
        if actual is not None and actual != self.meta.fingerprint:
            warnings.warn(f"{self.kind} artifact was tuned on model {self.meta.fingerprint}, this is {actual}; "
                          "it may not transfer", ArtifactModelWarning, stacklevel=stacklevel + 1)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.sha256() == self.sha256()

    def __hash__(self) -> int:
        return hash(self.sha256())

    def __repr__(self) -> str:
        m = self.meta
        parts = [f"nfe={m.nfe}" if m.nfe else "", f"guidance={m.guidance:g}" if m.guidance is not None else "",
                 f"model={m.fingerprint}" if m.fingerprint else ""]
        return f"{type(self).__name__}({', '.join(p for p in parts if p)})"


def _read_text(path: Path, kind: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{kind} artifact {path}: cannot read it ({exc})") from None


def _parse_json(text: str, path: Path, kind: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{kind} artifact {path}: not valid JSON ({exc})") from None
    except RecursionError:  # e.g. 100000 nested brackets: no artifact looks like that
        raise ArtifactError(f"{kind} artifact {path}: JSON nested too deeply to be an artifact") from None
