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

:class:`RunDir` is the only place these paths are built; :func:`atomic_path` the only place a temporary file is
renamed into place (a reader never sees a half-written file; a killed writer leaves a ``.<name>.tmp-<pid>``)."""

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
        self.root = root = Path(root)
        self.config = root / "config.yaml"
        self.lock = root / "run.lock"
        self.manifest = root / "manifest.parquet"
        self.manifest_report = root / "manifest_report.json"
        self.splits = root / "splits.json"
        self.stages = root / "stages"
        self.mlflow_parent = root / "mlflow_parent.json"
        self.features = root / "features"
        self.extract_report = self.features / "extract_report.json"
        self.teachers = root / "teacher"
        self.embeddings = root / "embeddings"
        self.students = root / "student"
        #: the token file every Ray node reads to prove it sees the run directory
        self.node_check = root / ".ray-node-check"
        self.report = root / "report"
        self.report_md = self.report / "report.md"
        self.summary = self.report / "summary.json"
        self.diagnose = root / "diagnose"

    def synthetic_root(self, kind: str) -> Path:
        return self.root / "data" / f"synthetic-{kind}"

    def marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def feature_table(self, modality: str) -> Path:
        """``features/<file>.parquet`` of a modality (video -> faces.parquet; table columns by name)."""
        return self.features / f"{MODALITY_FILES.get(modality, modality)}.parquet"

    def shards(self, modality: str | None = None) -> Path:
        base = self.features / "shards"
        return base if modality is None else base / modality

    def teacher(self, fold: int, seed: int, group: int | None = None, groups: int | None = None) -> Path:
        """Folder of the full-fold teacher job, or (``group`` of ``groups``) of a cross-fitting teacher job."""
        base = self.teachers / f"fold-{fold}" / f"seed-{seed}"
        if group is None:
            return base
        if groups is None:
            raise ValueError("RunDir.teacher: a crossfit group needs the number of groups")
        return base / f"crossfit-{groups}" / f"without-{group}"

    def cache(self, fold: int, seed: int, crossfit: int | None = None) -> Path:
        """``embeddings/fold-<k>-seed-<s>.parquet`` (``crossfit`` = J: ``...-crossfit<J>.parquet``)."""
        suffix = "" if crossfit is None else f"-crossfit{crossfit}"
        return self.embeddings / f"fold-{fold}-seed-{seed}{suffix}.parquet"

    def student(self, loss: str, fold: int, seed: int) -> Path:
        return self.students / loss / f"fold-{fold}" / f"seed-{seed}"

    def ray_runs(self, name: str) -> Path:
        """``ray/<name>/``: the Ray Train storage folder (checkpoints) of a stage's runs."""
        return self.root / "ray" / name

    @property
    def refit(self) -> RunDir:
        """``RUN/refit/``: the chosen configuration retrained on every subject (a run directory of its own)."""
        return RunDir(self.root / "refit")


# ---- atomic writes ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write (``.<stem>.tmp-<pid><suffix>``: matplotlib, OpenCV choose by the suffix);
    on success rename it onto ``path`` (atomic on POSIX), on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
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


def remove_temp_files(folder: str | Path) -> None:
    """Remove the ``.<name>.tmp-<pid>`` files a killed writer left under ``folder``."""
    for tmp in Path(folder).rglob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)


# ---- hashing ----------------------------------------------------------------------------------------------
_identity_memo: dict[tuple[str, int, int, int], list[Any]] = {}


def content_hash(path: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def file_identity(path: str | Path | None) -> list[Any] | None:
    """``["sha256", hash]`` of a small file, else ``["stat", size, mtime_ns]``; None for a missing path. Content
    hashes are memoised per (path, size, mtime, inode) within the process."""
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
        h.update(p.name.encode() + content_hash(p).encode())
    return h.hexdigest()[:16]


def source_hash(files: Iterable[Path], base: Path) -> str:
    """Hash of source files: each file's path relative to ``base`` and its content."""
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]
