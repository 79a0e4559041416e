"""One small error hierarchy: every message names the file/field and what was expected."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path


class PkdotError(Exception):
    """Base class of every error pkdot raises on purpose."""


class ConfigError(PkdotError):
    """A run configuration is invalid (names the field)."""


class DatasetError(PkdotError):
    """A dataset root, manifest or recording is not what the adapter expects (names the path)."""


class FeatureError(PkdotError):
    """Feature extraction failed on an input (names the sample/file and the reason)."""


class StaleCacheError(PkdotError):
    """An embedding cache does not match the teacher checkpoint it claims to come from."""


class StageError(PkdotError):
    """A pipeline stage is missing an upstream artifact or was given inconsistent inputs."""


class InfrastructureError(PkdotError):
    """A transient failure of the machinery, not of the input (a Ray worker or node died, I/O): the flow retries
    it, re-running resumes (:func:`pkdot.ray_utils.is_infrastructure_error`)."""


class ResourceError(PkdotError):
    """The machine ran out of something (disk, memory, file descriptors) or may not write somewhere: a retry
    cannot fix it, so it is never retried; the message names the path and what to do."""


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (``__cause__``, ``__context__``, Ray's ``cause``), outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return seen


def resource_error(exc: BaseException) -> ResourceError | None:
    """A :class:`ResourceError` in one line for an exhausted resource found in ``exc`` or what it wraps (disk full,
    out of memory, too many open files, permission denied), else None."""
    for e in _causes(exc):
        if isinstance(e, ResourceError):
            return e
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            return ResourceError(
                "out of memory: lower features.workers (extraction) or train.batch_size / "
                "train.max_concurrent_jobs (training), or use a machine with more memory"
            )
        if not isinstance(e, OSError):
            continue
        path = e.filename or "(a file whose name the system did not give)"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = ""
            with contextlib.suppress(OSError):
                if e.filename:
                    p = Path(os.path.abspath(str(path)))
                    existing = next(q for q in (p, *p.parents) if q.exists())
                    free = f" ({shutil.disk_usage(existing).free // 2**20} MB free now)"
            return ResourceError(
                f"disk full writing {path}{free}: free space on that file system (or point run_dir elsewhere) "
                "and re-run; finished work is kept"
            )
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return ResourceError(
                f"too many open files (at {path}): lower features.workers, or raise the limit (`ulimit -n`)"
            )
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return ResourceError(
                f"permission denied: {path}: make it writable by this user, or choose another run_dir"
            )
    return None
