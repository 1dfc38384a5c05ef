"""What to tell the user when the run directory cannot be written: a full disk, a read-only
or foreign folder, a file where a folder should be (or any other file cannot be used). These are the machine's answers (OSError
from a write, or SQLite's own wording for the response cache), not bugs: the loop turns them
into one message naming the file and what to do, instead of a traceback.

Nothing finished is lost by such a stop: records are appended one flushed line at a time and
whole files are renamed into place (harness.fileio), answers are in the cache before their usage
line (harness.llm.client), so a resumed run continues from the last whole record.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from pathlib import Path

_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}
_NOT_A_FOLDER = {errno.EEXIST, errno.ENOTDIR}
# SQLite reports these conditions in words, not errnos (sqlite3.OperationalError).
_SQLITE_FULL = ("database or disk is full",)
_SQLITE_DENIED = ("readonly database", "unable to open database file")


def _free(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(p).free / 1e6:.1f} MB free"
        except OSError:
            continue
    return "free space unknown"


def _kind(exc: OSError | sqlite3.Error) -> str:
    if isinstance(exc, OSError):
        if exc.errno in _FULL:
            return "full"
        if exc.errno == errno.EFBIG:
            return "limit"
        if exc.errno in _DENIED:
            return "denied"
        if exc.errno in _NOT_A_FOLDER:
            return "not-a-folder"
        return "other"
    text = str(exc).lower()
    if any(s in text for s in _SQLITE_FULL):
        return "full"
    if any(s in text for s in _SQLITE_DENIED):
        return "denied"
    if "disk i/o error" in text:
        return "refused"
    return "other"


def explain(exc: OSError | sqlite3.Error, run_dir: Path | None, *, option: str = "--run-dir") -> str:
    """One message for a failed write: what happened to which file, and the command to go on.
    `option`: the command-line option that names the folder (harness.report's is --out)."""
    where = Path(run_dir) if run_dir is not None else None
    if isinstance(exc, OSError) and exc.filename:
        target = Path(os.fsdecode(exc.filename))
    elif isinstance(exc, sqlite3.Error) and where is not None:
        target = where / "cache.sqlite"
    else:
        target = where
    what = f"cannot write {target}" if target is not None else "cannot write a file"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    resume = (f"python -m harness.loop --resume {where}" if where is not None and (where / "config.yaml").exists()
              else "the same command")
    kind = _kind(exc)
    cause = {"full": "the disk is full",
             "limit": "a file-size limit stops the write (ulimit -f, or a quota)",
             "refused": "the disk refused the write (full, over a quota or file-size limit, or failing)"}.get(kind)
    if cause is not None:
        return (f"{what}: {cause} ({reason}; {_free(target or Path.cwd())} there). Nothing finished is lost: "
                f"every record is written whole or not at all. Free some space or lift the limit (or move the run "
                f"directory to a larger disk) and continue with: {resume}")
    if kind == "denied":
        return (f"{what}: {reason}. A run directory must be writable: pick a folder you can write with "
                f"{option} <folder>, or make {where or target} writable (a run that has started can also be "
                f"copied somewhere writable and continued there with --resume <copy>)")
    if kind == "not-a-folder":
        holds = ", new or holding a run" if option == "--run-dir" else ""
        return (f"{what}: {target} (or a folder above it) is a file, not a folder; {option} must name a "
                f"folder{holds}: pick another path")
    return f"cannot use {target or 'a file'}: {reason}. Fix the cause and run {resume}"


__all__ = ["explain"]
