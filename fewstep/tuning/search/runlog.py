"""Crash-safe search records: an append-only JSONL log of evaluations and an atomic state file.

Every finished evaluation is one line of ``search_log.jsonl`` (flushed and fsynced before the
next starts), so a ``kill -9`` loses at most the evaluation in flight; a torn last line is
dropped on resume. ``state.json`` holds what the log cannot: the search's identity and its
random state at the last proposal, written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fewstep.infra.io import atomic_write_bytes, finite_json, read_json, write_json

__all__ = ["SearchLog", "check_identity"]


class SearchLog:
    """The evaluations of one search (``entries``), backed by ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        if not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").split("\n")
        torn = False
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                self.entries.append(json.loads(line))
            except json.JSONDecodeError:
                if n != len(lines) - 1:  # only the last line can be half-written
                    raise ValueError(f"{self.path} line {n + 1} is not valid JSON; the search log is corrupt "
                                     "(delete the run folder to start over)") from None
                torn = True
        if torn or (lines and lines[-1].strip()):
            self._rewrite()

    def _rewrite(self) -> None:
        text = "".join(json.dumps(finite_json(e)) + "\n" for e in self.entries)
        atomic_write_bytes(self.path, text.encode())

    def append(self, entry: dict[str, Any]) -> None:
        """Add one entry durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(finite_json(entry)) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk raises without a file name: say which file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)


def check_identity(state_path: str | Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state if it belongs to this search; None if there is none.

    Raises:
        ValueError: the folder holds a search with other settings (naming them).
    """
    path = Path(state_path)
    if not path.exists():
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("identity"), dict):
        raise ValueError(f"{path} is not a fewstep search state; delete the run folder to start over")
    old = state["identity"]
    if old != finite_json(identity):
        differs = sorted(k for k in set(old) | set(identity) if old.get(k) != finite_json(identity).get(k))
        raise ValueError(f"{path.parent} holds a search with other settings (differs in: {differs}); "
                         "choose another run folder or delete it")
    return state


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the state atomically."""
    write_json(path, state)
