"""Every path of a run directory, the one atomic-write helper, and file hashing.

A run directory is what the stages hand each other::

    RUN/config.yaml                       the validated run config (written by prepare)
    RUN/run.lock                          the writer's lock (pkdot.pipeline.lock)
    RUN/data/synthetic-<kind>/            a generated data set (no data.root given)
    RUN/manifest.parquet, manifest_report.json
    RUN/features/<file>.parquet, features/extract_report.json, features/shards/<modality>/...
    RUN/splits.json                       each seed's subject folds (pkdot.folds)
    RUN/teacher/fold-<k>/seed-<s>[/crossfit-<J>/without-<j>]/   teacher job: *.pt, history.json, metrics.json
    RUN/embeddings/fold-<k>-seed-<s>[-crossfit<J>].parquet      frozen teacher outputs
    RUN/student/<loss>/fold-<k>/seed-<s>/                        student job
    RUN/report/                           report.md, summary.json, plots
    RUN/refit/                            the chosen configuration refit on every subject (same layout)
    RUN/diagnose/                         pkdot diagnose --run: diagnose.json, diagnose.png
    RUN/stages/<stage>.json               stage markers (pkdot.pipeline.base)

:class:`RunDir` is the only place these paths are built. :func:`atomic_path` is the only place a temporary file
is renamed into place: every writer (text, JSON, torch, Parquet, figures) goes through it, so a reader never sees
a half-written file and a killed writer leaves only a ``.<name>.tmp-<pid>`` file behind
(:func:`remove_temp_files`).

Hashing: :func:`content_hash` of a file's bytes, :func:`file_identity` (content for small files, size + mtime
for large ones), :func:`hash_json` of a payload, :func:`hash_files` of a set of files, :func:`source_hash` of
source files. Stage fingerprints and job-level resume (``DONE.json``) both use these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pkdot.config import MODALITY_FILES

#: The package's source directory (what stage code hashes read).
PACKAGE_DIR = Path(__file__).resolve().parent

#: Files up to this size are identified by a hash of their content; larger ones by size and mtime.
SMALL_FILE_BYTES = 256 * 1024

#: File names inside a training job's folder.
HISTORY = "history.json"
METRICS = "metrics.json"
DONE = "DONE.json"


class RunDir:
    """The paths of one run directory (nothing is created by building a path)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- run level --------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"

    def synthetic_root(self, kind: str) -> Path:
        return self.root / "data" / f"synthetic-{kind}"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def manifest_report(self) -> Path:
        return self.root / "manifest_report.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    @property
    def prefect_results(self) -> Path:
        return self.root / ".prefect" / "results"

    @property
    def mlflow_parent(self) -> Path:
        return self.root / "mlflow_parent.json"

    # ---- features ---------------------------------------------------------------------------------------
    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_table(self, modality: str) -> Path:
        """``features/<file>.parquet`` of a modality (video -> faces.parquet; table columns by name)."""
        return self.features / f"{MODALITY_FILES.get(modality, modality)}.parquet"

    @property
    def extract_report(self) -> Path:
        return self.features / "extract_report.json"

    def shards(self, modality: str | None = None) -> Path:
        base = self.features / "shards"
        return base if modality is None else base / modality

    # ---- training ---------------------------------------------------------------------------------------
    @property
    def teachers(self) -> Path:
        return self.root / "teacher"

    def teacher(self, fold: int, seed: int, group: int | None = None, groups: int | None = None) -> Path:
        """Folder of the full-fold teacher job, or (``group`` of ``groups``) of a cross-fitting teacher job."""
        base = self.teachers / f"fold-{fold}" / f"seed-{seed}"
        if group is None:
            return base
        if groups is None:
            raise ValueError("RunDir.teacher: a crossfit group needs the number of groups")
        return base / f"crossfit-{groups}" / f"without-{group}"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    def cache(self, fold: int, seed: int, crossfit: int | None = None) -> Path:
        """``embeddings/fold-<k>-seed-<s>.parquet`` (``crossfit`` = J: ``...-crossfit<J>.parquet``)."""
        suffix = "" if crossfit is None else f"-crossfit{crossfit}"
        return self.embeddings / f"fold-{fold}-seed-{seed}{suffix}.parquet"

    @property
    def students(self) -> Path:
        return self.root / "student"

    def student(self, loss: str, fold: int, seed: int) -> Path:
        return self.students / loss / f"fold-{fold}" / f"seed-{seed}"

    def ray_runs(self, name: str) -> Path:
        """``ray/<name>/``: the Ray Train storage folder (checkpoints) of a stage's runs."""
        return self.root / "ray" / name

    @property
    def node_check(self) -> Path:
        """The token file every Ray node reads to prove it sees the run directory."""
        return self.root / ".ray-node-check"

    @property
    def refit(self) -> RunDir:
        """``RUN/refit/``: the chosen configuration retrained on every subject (a run directory of its own)."""
        return RunDir(self.root / "refit")

    # ---- evaluation -------------------------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_md(self) -> Path:
        return self.report / "report.md"

    @property
    def summary(self) -> Path:
        return self.report / "summary.json"

    @property
    def diagnose(self) -> Path:
        """``diagnose/``: what ``pkdot diagnose --run`` writes (diagnose.json, diagnose.png)."""
        return self.root / "diagnose"


# ---- atomic writes ----------------------------------------------------------------------------------------
def temp_path(path: str | Path) -> Path:
    """The temporary sibling a writer fills before :func:`atomic_path` renames it (keeps the suffix, so writers
    that choose a format by suffix, e.g. matplotlib or OpenCV, still work)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it onto ``path`` (atomic on POSIX), on error remove it.

    The only place in pkdot that renames a temporary file into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, payload: Any, *, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(payload, indent=indent, default=str))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` of tensors and plain containers (read back with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_parquet(frame: Any, path: str | Path, **kwargs: Any) -> None:
    """A pandas DataFrame or a pyarrow Table to Parquet."""
    with atomic_path(path) as tmp:
        if hasattr(frame, "to_parquet"):
            frame.to_parquet(tmp, **kwargs)
        else:
            import pyarrow.parquet as pq

            pq.write_table(frame, tmp, **kwargs)


def remove_temp_files(folder: str | Path) -> int:
    """Remove the ``.<name>.tmp-<pid>`` files a killed writer left under ``folder``; returns how many."""
    n = 0
    for tmp in Path(folder).rglob(".*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


# ---- hashing ----------------------------------------------------------------------------------------------
_identity_memo: dict[tuple[str, int, int, int], list[Any]] = {}


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
    """``[size, mtime_ns]`` of an output file (recorded in a marker; compared cheaply later)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def hash_json(payload: Any) -> str:
    """SHA-256 (first 16 hex digits) of a JSON-serialisable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_files(paths: Iterable[str | Path]) -> str:
    """One hash of a set of files: each file's name and content hash, in sorted path order."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        h.update(content_hash(p).encode())
    return h.hexdigest()[:16]


def source_hash(files: Iterable[Path], base: Path) -> str:
    """Hash of source files: each file's path relative to ``base`` and its content (edits, additions and
    removals all change it)."""
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.relative_to(base).as_posix().encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]
