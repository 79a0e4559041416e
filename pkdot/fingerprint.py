"""Content fingerprints: one key per stage, shared by the stage markers and the Prefect cache.

A stage's *key* (:func:`stage_key`) decides whether its outputs are up to date. It hashes

- the config sections the stage reads (:data:`STAGE_SECTIONS`, always with ``seed``),
- the upstream stage's *output* fingerprint (so a change anywhere upstream changes every key below it),
- the source code that computes the stage (:func:`code_hash`: a hash of the ``pkdot/`` source files listed in
  :data:`STAGE_CODE`, not the version string, so editing a stage's code re-runs it),
- for ``evaluate``, the MLflow tracking URI it registers to; for ``distill``, the losses trained.

The identity of the input *recordings* enters through the manifest's fingerprint (the first upstream): it
covers the manifest rows and :func:`file_identity` of every recording and of the data root's index files, so
zeroing or rewriting a recording changes the key of ``extract`` and of everything below it.

:func:`file_identity` is a content hash for small files (at most :data:`SMALL_FILE_BYTES`, e.g. CSVs and
``samples.csv``: a copy or a ``touch`` does not invalidate anything) and ``size + mtime`` for larger ones
(videos: reading them all at every run would cost minutes).

``flows/pipeline.py`` computes its Prefect cache keys with :func:`stage_key`; the library's stage markers
(``RUN/stages/<stage>.json``) record the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pkdot.config import RunConfig
from pkdot.errors import StageError

#: The package's source directory (what :func:`code_hash` reads).
PACKAGE_DIR = Path(__file__).resolve().parent

#: Files up to this size are identified by a hash of their content; larger ones by size and mtime.
SMALL_FILE_BYTES = 256 * 1024

#: Stages in execution order.
STAGES: tuple[str, ...] = ("manifest", "extract", "train-teacher", "cache", "distill", "evaluate")

#: The config sections (top-level RunConfig fields) each stage's outputs depend on. Over-inclusion only costs
#: a re-run; under-inclusion would reuse stale results, so when in doubt a section is listed.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "manifest": ("seed", "data", "train"),
    "extract": ("seed", "data", "features"),
    "train-teacher": ("seed", "data", "features", "model", "train"),
    "cache": ("seed", "data", "model", "train"),
    "distill": ("seed", "data", "model", "train", "distill"),
    "evaluate": ("seed", "data", "train", "distill", "tracking", "evaluate"),
}

#: Source files (relative to ``pkdot/``; a directory means every ``*.py`` under it) whose code computes each
#: stage. ``stages.py`` and this module are part of every stage.
COMMON_CODE: tuple[str, ...] = ("stages.py", "fingerprint.py")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "manifest": ("data",),
    "extract": ("features", "data/manifest.py", "ray_utils.py"),
    "train-teacher": ("models", "train", "data/manifest.py", "ray_utils.py"),
    "cache": ("models", "train"),
    "distill": ("distill", "models", "train", "ray_utils.py"),
    "evaluate": ("evaluate", "tracking.py", "models", "train"),
}

_identity_memo: dict[tuple[str, int, int, int], list[Any]] = {}


# ---- files ------------------------------------------------------------------------------------------------
def content_hash(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def file_identity(path: str | Path | None) -> list[Any] | None:
    """What identifies a file's content: ``["sha256", hash]`` when it is small, else ``["stat", size, mtime_ns]``.

    None for a missing path (so a file appearing or disappearing changes the identity too). Content hashes are
    memoised per (path, size, mtime, inode) within the process.
    """
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size > SMALL_FILE_BYTES or not Path(path).is_file():
        return ["stat", st.st_size, st.st_mtime_ns]
    memo_key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo_key not in _identity_memo:
        try:
            _identity_memo[memo_key] = ["sha256", content_hash(path)]
        except OSError:
            return ["stat", st.st_size, st.st_mtime_ns]
    return _identity_memo[memo_key]


def output_stamp(path: str | Path) -> list[int]:
    """``[size, mtime_ns]`` of a stage output (recorded in its marker; compared cheaply by downstream stages)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def hash_json(payload: Any) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- code ---------------------------------------------------------------------------------------------------
def _source_files(entries: Iterable[str], package_dir: Path) -> list[Path]:
    files: set[Path] = set()
    for entry in entries:
        p = package_dir / entry
        if p.is_dir():
            files.update(q for q in p.rglob("*.py") if "__pycache__" not in q.parts)
        elif p.is_file():
            files.add(p)
    return sorted(files)


def source_hash(entries: Iterable[str], package_dir: Path | None = None) -> str:
    """Hash of the named source files of the package (paths relative to ``pkdot/``; directories recurse).

    The hash covers each file's relative path and content, so editing, adding or removing a file changes it.
    """
    base = Path(package_dir or PACKAGE_DIR)
    h = hashlib.sha256()
    for f in _source_files(entries, base):
        h.update(f.relative_to(base).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def code_hash(stage: str, package_dir: Path | None = None) -> str:
    """Hash of the source code that computes ``stage`` (:data:`STAGE_CODE` + :data:`COMMON_CODE`)."""
    _check_stage(stage)
    return source_hash((*STAGE_CODE[stage], *COMMON_CODE), package_dir)


# ---- stage keys -------------------------------------------------------------------------------------------
def _check_stage(stage: str) -> None:
    if stage not in STAGE_SECTIONS:
        raise StageError(f"unknown stage {stage!r} (expected one of {list(STAGES)})")


def stage_key(cfg: RunConfig, stage: str, upstream: str, *, losses: Iterable[str] | None = None) -> str:
    """The key under which ``stage``'s outputs are up to date (stage markers and Prefect cache alike).

    Parameters
    ----------
    cfg : the run's configuration (after :func:`pkdot.stages.prepare_run`).
    stage : one of :data:`STAGES`.
    upstream : the output fingerprint of the previous stage (``""`` for the manifest).
    losses : distill only: the losses trained (default ``cfg.distill.losses``).

    Returns
    -------
    str : 16 hex digits.
    """
    _check_stage(stage)
    payload: dict[str, Any] = {
        "stage": stage,
        "sections": cfg.section_hash(*STAGE_SECTIONS[stage]),
        "upstream": upstream or "",
        "code": code_hash(stage),
    }
    if stage == "distill":
        payload["losses"] = list(losses or cfg.distill.losses)
    if stage in ("train-teacher", "cache") and cfg.distill.teacher_targets == "crossfit":
        # cross-fitted targets add teacher jobs and change the cache (fit keys stay as they were)
        payload["teacher_targets"] = ["crossfit", cfg.distill.crossfit_groups]
    if stage == "cache" and cfg.distill.teacher_source != "fusion":
        # another model's targets (fusion keys stay as they were)
        payload["teacher_source"] = cfg.distill.teacher_source
    if stage == "evaluate":
        from pkdot.tracking import resolve_tracking_uri  # imports mlflow: only when needed

        payload["tracking_uri"] = resolve_tracking_uri(cfg)
    return hash_json(payload)


def recordings_identity(frame: Any, root: str | Path | None) -> str:
    """Hash of the identity of every recording a manifest names and of the data root's index files.

    Parameters
    ----------
    frame : the manifest (pandas DataFrame); its ``video_path``, ``physio_path`` and ``audio_path`` columns.
    root : the data root: a file (a bring-your-own table) is identified itself; a directory by its top-level
        files (``samples.csv``, annotation indexes, ...).
    """
    idents: dict[str, Any] = {}
    for col in ("video_path", "physio_path", "audio_path"):
        if col not in getattr(frame, "columns", ()):
            continue
        for value in frame[col].tolist():
            if isinstance(value, str) and value and value not in idents:
                idents[value] = file_identity(value)
    if root is not None:
        root = Path(root)
        if root.is_file():
            idents[str(root)] = file_identity(root)
        elif root.is_dir():
            for p in sorted(root.iterdir()):
                if p.is_file():
                    idents[str(p)] = file_identity(p)
    return hash_json(idents)
