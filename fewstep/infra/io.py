"""Crash-safe result files: every write goes to a temporary file first, then ``os.replace``.

Temporary files are named ``.<name>.<pid>.<random>.tmp`` beside their target, created
with the usual permissions (umask applies, unlike ``mkstemp``'s 0600). A ``kill -9``
cannot run any cleanup, so long jobs call :func:`clean_temp_files` when they start:
it removes the temporary files of processes that no longer exist.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "atomic_write_bytes", "write_json", "read_json", "save_tensors", "load_tensors", "clean_temp_files",
    "lock_directory", "lock_work_folder", "DirectoryLockedError", "finite_json", "claim_identity", "cache_folder",
]

_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half of it.

    Raises:
        OSError: naming ``path`` (not the temporary file) when it cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # its own OSError names the folder
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    _fsync_dir(path.parent)


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/Infinity: null, no value)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, standard JSON (non-finite floats become null)."""
    text = json.dumps(finite_json(obj), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read JSON, raising ValueError that names the file when it is corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write tensors as safetensors."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_tensors(path: str | Path, with_metadata: bool = False):
    """Load a safetensors file.

    Args:
        path: The file.
        with_metadata: Also return the file's string metadata.

    Returns:
        ``{name: tensor}``, or ``({name: tensor}, metadata)`` with ``with_metadata``.

    Raises:
        ValueError: naming the file when it is not a readable safetensors file.
        OSError: when it cannot be opened (missing, a directory, no permission).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except OSError:
        raise
    except Exception as exc:  # safetensors raises its own (non-OSError) type for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({exc}); delete it to recompute") from None
    return (tensors, metadata) if with_metadata else tensors


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_temp_files(directory: str | Path, *, all_stale: bool = False, name: str | None = None) -> list[Path]:
    """Remove temporary files left in ``directory`` by killed writers.

    Args:
        directory: Folder to clean (not recursive); a missing folder is fine.
        all_stale: Every temporary file there is stale (the caller holds the folder's
            lock); otherwise only those of processes that no longer exist are removed.
        name: Only the temporary files of this final file (an output beside other people's files).

    Returns:
        The files removed.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:  # missing, not a folder, unreadable: nothing we may clean
        return removed
    for entry in names:
        m = _TEMP_NAME.match(entry)
        if m is None or (name is not None and not entry.startswith(f".{name}.")):
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or (not all_stale and _pid_alive(pid)):
            continue
        path = Path(directory) / entry
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # gone already, or a read-only folder
            pass
    return removed


class DirectoryLockedError(ValueError):
    """Another process holds the lock on a run directory."""


_HELD_LOCKS: dict[str, list] = {}  # resolved path -> [fd, depth]: re-entrant within one process


@contextmanager
def lock_directory(directory: str | Path, what: str = "another fewstep run") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for one writer at a time.

    The lock is an ``flock`` on the directory itself: no lock file is left behind, and a
    killed holder releases it with its last file descriptor, so a stale lock never blocks.
    Re-entrant within a process. Where ``fcntl`` is missing (Windows) nothing is locked.

    Raises:
        DirectoryLockedError: another process holds the lock.
        OSError: the directory cannot be created or opened.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(directory))
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield directory
        return
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
    else:
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryLockedError(
                f"{directory} is in use by {what} (it holds the folder's lock); wait for it to finish "
                f"or choose another output folder") from None
        _HELD_LOCKS[key] = [fd, 1]
    try:
        yield directory
    finally:
        held = _HELD_LOCKS[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD_LOCKS[key]
            os.close(held[0])  # closing the last descriptor releases the flock


@contextmanager
def lock_work_folder(folder: str | Path, out: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock of the work folder of a job whose output file ``out`` lies outside it, after
    removing what killed writers left: every temporary file in ``folder`` (the lock is ours) and,
    beside ``out`` (a folder other files share), only ``out``'s own of writers that are gone.

    Raises:
        DirectoryLockedError: another process holds the folder's lock.
    """
    out = Path(out)
    with lock_directory(folder, what) as held:
        clean_temp_files(held, all_stale=True)
        clean_temp_files(out.parent, name=out.name)
        yield held


def claim_identity(path: str | Path, identity: dict[str, Any], holds: str, advice: str) -> None:
    """Record the settings of a resumable run in ``path``, or check that the recorded ones are the same.

    Args:
        path: The JSON file in the run folder.
        identity: Everything that determines the run's results (JSON-serialisable).
        holds: What a folder of other settings holds, for the message (e.g. ``"a run of a different configuration"``).
        advice: What the user can do instead, for the message.

    Raises:
        ValueError: ``path`` records other settings: ``"<folder> holds <holds> (differs in: [keys]); <advice>"``.
    """
    path = Path(path)
    if not path.exists():
        write_json(path, identity)
        return
    old = read_json(path)
    if old != identity:
        differs = sorted(k for k in identity if not isinstance(old, dict) or old.get(k) != identity[k])
        raise ValueError(f"{path.parent} holds {holds} (differs in: {differs}); {advice}")


def cache_folder(kind: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of one kind of cached file: ``<cache_dir>/<kind>``.

    ``cache_dir`` is fewstep's cache (what every command's ``--cache-dir`` names); None:
    ``$FEWSTEP_CACHE``, else ``~/.cache/fewstep``. Commands keep reference samples in
    ``references/``, reference statistics in ``stats/`` and ``eval mse`` references in
    ``mse-references/``, so one ``--cache-dir`` serves them all.
    """
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))
    return root / kind
