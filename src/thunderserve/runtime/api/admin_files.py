"""Which files `/admin/replan` may read: built-in presets, and regular files inside one allowed folder.

An admin event names a workload (`workload:NAME|CSV`) or nodes to add (`add:NODE.yaml`). Without this
check the server would open any path it is given (`/dev/zero` grew the router to 20 GB; `/etc/passwd` had its
first line echoed back). So: presets are always allowed; a file only when the server was started with an
allowed folder (`serve --admin-files-dir DIR`, none by default), it resolves (symlinks followed) to a regular
file inside that folder and it is at most `max_bytes` long. Loading happens off the event loop (the
controller's `asyncio.to_thread`); an error names the event and what was wrong, never the file's content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path

from thunderserve.resched.events import EventKind, ReschedEvent
from thunderserve.runtime.api.protocol import ApiError
from thunderserve.spec.workload import PRESETS

DEFAULT_ADMIN_FILE_MAX_BYTES = 64 * 1024 * 1024  # a long trace CSV is a few MB


@dataclass(frozen=True)
class AdminFiles:
    """The folder admin events may name files in (None: presets only) and the size cap of such a file."""

    folder: Path | None = None
    max_bytes: int = DEFAULT_ADMIN_FILE_MAX_BYTES


def confine_event(event: ReschedEvent, files: AdminFiles) -> ReschedEvent:
    """The event with its file resolved inside the allowed folder; 400 when it names anything else.
    Blocking (stat calls): run it off the event loop."""
    if event.kind is EventKind.WORKLOAD and event.workload is not None:
        if event.workload in PRESETS:
            return event
        return replace(event, workload=str(_confine(event.workload, files, "workload")))
    if event.kind is EventKind.ADD and event.add_path is not None:
        return replace(event, add_path=str(_confine(event.add_path, files, "add")))
    return event


def _confine(ref: str, files: AdminFiles, kind: str) -> Path:
    where = f"event {kind}:{ref}"
    if files.folder is None:
        hint = f" (presets: {', '.join(sorted(PRESETS))})" if kind == "workload" else ""
        raise ApiError(400, f"{where}: this server reads no files for admin events{hint}; start it with "
                            "--admin-files-dir DIR to allow files inside DIR", param="event", code="file_not_allowed")
    root = files.folder.resolve()
    try:
        path = (root / ref).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ApiError(400, f"{where}: no such file in the admin files folder", param="event",
                       code="file_not_found") from None
    if not path.is_relative_to(root):
        raise ApiError(400, f"{where}: outside the admin files folder", param="event", code="file_not_allowed")
    try:
        st = os.stat(path)
    except OSError:
        raise ApiError(400, f"{where}: cannot be read", param="event", code="file_not_found") from None
    if not stat.S_ISREG(st.st_mode):
        raise ApiError(400, f"{where}: not a regular file", param="event", code="file_not_allowed")
    if st.st_size > files.max_bytes:
        raise ApiError(400, f"{where}: {st.st_size} bytes, more than the limit of {files.max_bytes}",
                       param="event", code="file_too_large")
    return path
