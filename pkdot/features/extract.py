"""Stage 1: feature extraction over a manifest, sharded on Ray, resumable, merged into aligned tables.

The manifest is cut into shards of ``features.shard_size`` consecutive rows. Every (modality, shard) pair is
one Ray task (``num_cpus=1``, at most ``workers`` in flight) that writes
``<run>/features/shards/<modality>/shard-<i>-<hash>.parquet`` atomically (temp file, then rename). The hash
covers the shard's manifest rows as extraction sees them (sample ids, recording paths with their sizes and
modification times, clip windows), the modality's feature settings and the code version of its extractor,
so a re-run skips every shard whose file exists with the same hash and redoes the others. Each shard file
carries its summary (samples quarantined with reasons, face detection counts, quality flags, timing) in its
Parquet metadata, so the report is complete even when every shard was skipped.

The shards are then merged, streaming, into ``<run>/features/{faces,physio,audio}.parquet``: a sample is
written only if every modality it needs succeeded, so the tables align on ``sample_id`` (manifest order).
Tables are written under temp names and renamed at the end; ``extract_report.json`` is removed at the start
and written last, so its presence marks a complete extraction.

For the bring-your-own ``table`` data set, ``cfg.data.root`` is a Parquet file whose modality columns hold
one numeric vector per row; each becomes ``<column>.parquet`` with a ``vector`` float32 (D,) tensor, with the
same validation and report, without shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pkdot.config import FeatureConfig, RunConfig
from pkdot.errors import ConfigError, DatasetError, FeatureError
from pkdot.features import audio as audio_features
from pkdot.features import faces as face_features
from pkdot.features import physio as physio_features
from pkdot.features.schema import (
    AUDIO_SCHEMA,
    FACES_SCHEMA,
    PHYSIO_SCHEMA,
    ROW_GROUP_SIZE,
    VECTOR_SCHEMA,
    encode_tensor,
    feature_path,
    write_table_atomic,
)
from pkdot.progress import report as report_progress

logger = logging.getLogger(__name__)

REPORT_NAME = "extract_report.json"
SHARD_META_KEY = "pkdot_shard"
EXTRACTED_MODALITIES = ("video", "physio", "audio")
MODALITY_SCHEMA: dict[str, pa.Schema] = {
    "video": FACES_SCHEMA,
    "physio": PHYSIO_SCHEMA,
    "audio": AUDIO_SCHEMA,
}
#: Feature settings (FeatureConfig fields) each extractor's output depends on.
MODALITY_SETTINGS: dict[str, tuple[str, ...]] = {
    "video": (
        "n_frames",
        "crop_size",
        "face_margin",
        "detector",
        "yunet_model",
        "detect_width",
        "min_face_px",
        "detect_every",
        "box_smoothing",
    ),
    "physio": (
        "physio_fs",
        "physio_channels",
        "physio_window",
        "max_nan_gap_s",
        "spec_nperseg",
        "spec_noverlap",
        "spec_nfft",
    ),
    "audio": ("audio_sr", "n_mels", "hop_length"),
}
MODALITY_VERSION: dict[str, int] = {
    "video": face_features.FACES_VERSION,
    "physio": physio_features.PHYSIO_VERSION,
    "audio": audio_features.AUDIO_VERSION,
}
#: Source files (relative to ``pkdot/``) whose code computes each modality's shard rows.
MODALITY_CODE: dict[str, tuple[str, ...]] = {
    "video": ("features/faces.py", "features/schema.py"),
    "physio": ("features/physio.py", "features/schema.py"),
    "audio": ("features/audio.py", "features/schema.py"),
}
#: Manifest columns each modality reads.
MODALITY_COLUMNS: dict[str, tuple[str, ...]] = {
    "video": ("video_path", "start_frame", "num_frames"),
    "physio": ("physio_path",),
    "audio": ("audio_path", "video_path", "start_frame", "num_frames"),
}


@dataclass
class ShardJob:
    """One (modality, shard) unit of work: the rows it extracts and the file it writes."""

    modality: str
    index: int
    rows: list[dict[str, Any]]
    key: str
    path: Path
    part: str = "A"


@dataclass
class _ShardSummary:
    modality: str
    index: int
    key: str
    rows: int = 0
    ok: list[str] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    sampled_frames: int = 0
    detected_frames: int = 0
    lost_frames: dict[str, int] = field(default_factory=dict)
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    audio_padded_s: dict[str, float] = field(default_factory=dict)
    silent: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # peak resident memory of the process that extracted the shard

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str | bytes) -> _ShardSummary:
        return cls(**json.loads(text))


# ---- planning -----------------------------------------------------------------------------------------------
def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v is pd.NaT


def _opt_int(v: Any) -> int | None:
    return None if _is_null(v) else int(v)


def _opt_str(v: Any) -> str | None:
    return None if _is_null(v) or str(v) == "" else str(v)


def _opt_path(v: Any) -> str | None:
    """A recording path made absolute (relative paths are relative to the driver's working directory)."""
    text = _opt_str(v)
    return None if text is None else str(Path(text).expanduser().absolute())


def _file_stamp(path: str | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _modality_settings(features: FeatureConfig, modality: str, part: str) -> dict[str, Any]:
    from pkdot.fingerprint import source_hash

    dump = features.model_dump(mode="json")
    settings = {k: dump[k] for k in MODALITY_SETTINGS[modality]}
    settings["version"] = MODALITY_VERSION[modality]
    # The extractor's code: editing it re-extracts that modality's shards (not the others').
    settings["code"] = source_hash(MODALITY_CODE[modality])
    if modality == "physio":
        settings["physio_channels"] = physio_features.resolve_channels(features, part)
    if modality == "video" and features.detector == "yunet":
        settings["yunet_stamp"] = _file_stamp(str(features.yunet_model))
    return settings


def shard_key(modality: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Hash of a shard: its rows (with the identity of every recording they name) and the settings.

    A recording's identity is :func:`pkdot.fingerprint.file_identity` (content hash of a small file, size +
    mtime of a large one), the same one the manifest's fingerprint uses.
    """
    from pkdot.fingerprint import file_identity

    stamped = []
    for row in rows:
        stamps = {c: file_identity(row[c]) for c in ("video_path", "physio_path", "audio_path") if c in row}
        stamped.append({**row, "stamps": stamps})
    payload = json.dumps(
        {"modality": modality, "settings": settings, "rows": stamped}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_shards(cfg: RunConfig, manifest: pd.DataFrame, run_dir: Path) -> list[ShardJob]:
    """Cut the manifest into shards of ``features.shard_size`` rows, one job per (modality, shard)."""
    features = cfg.features
    size = features.shard_size
    records = manifest.to_dict("records")
    jobs: list[ShardJob] = []
    for modality in cfg.data.modalities:
        settings = _modality_settings(features, modality, cfg.data.part)
        out_dir = run_dir / "features" / "shards" / modality
        for index, first in enumerate(range(0, len(records), size)):
            rows = []
            for rec in records[first : first + size]:
                row: dict[str, Any] = {"sample_id": str(rec["sample_id"])}
                for col in MODALITY_COLUMNS[modality]:
                    row[col] = (
                        _opt_int(rec.get(col))
                        if col in ("start_frame", "num_frames")
                        else _opt_path(rec.get(col))
                    )
                rows.append(row)
            key = shard_key(modality, rows, settings)
            jobs.append(
                ShardJob(
                    modality, index, rows, key, out_dir / f"shard-{index:05d}-{key}.parquet", cfg.data.part
                )
            )
    return jobs


# ---- per-shard extraction (runs in a Ray worker) ------------------------------------------------------------
def extract_shard(job: ShardJob, features: FeatureConfig) -> dict[str, Any]:
    """Extract one shard and write its Parquet file atomically; returns the shard's summary (a small dict).

    Bad recordings are quarantined (listed with the reason in the summary), never raised.
    """
    t0 = time.perf_counter()
    summary = _ShardSummary(job.modality, job.index, job.key, rows=len(job.rows))
    extractor = {"video": _extract_faces_rows, "physio": _extract_physio_rows, "audio": _extract_audio_rows}[
        job.modality
    ]
    results = extractor(job, features, summary)
    out_rows = []
    for row in job.rows:  # manifest order
        sid = row["sample_id"]
        if sid in results:
            out_rows.append(results[sid])
            summary.ok.append(sid)
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    write_table_atomic(
        out_rows, MODALITY_SCHEMA[job.modality], job.path, metadata={SHARD_META_KEY: summary.to_json()}
    )
    return summary.__dict__


def _quarantine(summary: _ShardSummary, sample_id: str, reason: str) -> None:
    logger.warning("quarantined %s (%s): %s", sample_id, summary.modality, reason)
    summary.quarantined.append({"sample_id": sample_id, "modality": summary.modality, "reason": reason})


def _group_by(
    rows: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], str]
) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _extract_faces_rows(job: ShardJob, features: FeatureConfig, summary: _ShardSummary) -> dict[str, dict]:
    detector = face_features.FaceDetector(features)
    results: dict[str, dict] = {}
    with_video = [r for r in job.rows if r["video_path"] is not None]
    for row in job.rows:
        if row["video_path"] is None:
            _quarantine(summary, row["sample_id"], "the manifest gives no video_path")
    for path, rows in _group_by(with_video, lambda r: r["video_path"]).items():
        clips = [
            face_features.ClipRequest(
                r["sample_id"],
                r["start_frame"] or 0,
                r["num_frames"],
                face_features.face_side(r["sample_id"], path),
            )
            for r in rows
        ]
        # A folder is a face-crop source (Aff-Wild2 cropped_aligned, Biovid frame folders); a file a video.
        extracted = (
            face_features.extract_folder_clips(path, clips, features)
            if Path(path).is_dir()
            else face_features.extract_video_clips(path, clips, features, detector)
        )
        for clip in extracted:
            if isinstance(clip, face_features.ClipFailure):
                summary.sampled_frames += clip.sampled_frames
                _quarantine(summary, clip.sample_id, clip.reason)
                continue
            summary.sampled_frames += len(clip.detected)
            summary.detected_frames += int(clip.detected.sum())
            if clip.lost_frames:
                summary.lost_frames[clip.sample_id] = clip.lost_frames
            results[clip.sample_id] = {
                "sample_id": clip.sample_id,
                **encode_tensor("frames", clip.frames),
                "face_found": clip.face_found,
                "boxes": clip.boxes.reshape(-1).tolist(),
                "lost_frames": clip.lost_frames,
            }
    return results


def _extract_physio_rows(job: ShardJob, features: FeatureConfig, summary: _ShardSummary) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for row in job.rows:
        sid = row["sample_id"]
        if row["physio_path"] is None:
            _quarantine(summary, sid, "the manifest gives no physio_path")
            continue
        outcome = physio_features.extract_physio(sid, row["physio_path"], features, job.part)
        flagged = {ch: q.as_dict() for ch, q in outcome.quality.items() if q.flags}
        if flagged:
            summary.quality[sid] = flagged
        if outcome.features is None:
            _quarantine(summary, sid, outcome.reason or "unknown physio failure")
            continue
        f = outcome.features
        results[sid] = {
            "sample_id": sid,
            **encode_tensor("window", f.window),
            **encode_tensor("spectrogram", f.spectrogram),
            "channels": f.channels,
            "eda_level": f.eda_level,
            "eda_slope": f.eda_slope,
            "heart_rate": f.heart_rate,
            "emg_rms": f.emg_rms,
        }
    return results


def _extract_audio_rows(job: ShardJob, features: FeatureConfig, summary: _ShardSummary) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with_media = []
    for row in job.rows:
        if (row["audio_path"] or row["video_path"]) is None:
            _quarantine(summary, row["sample_id"], "the manifest gives neither audio_path nor video_path")
        else:
            with_media.append(row)
    for _, rows in _group_by(with_media, lambda r: f"{r['audio_path']}|{r['video_path']}").items():
        media = rows[0]["audio_path"] or rows[0]["video_path"]
        fps: float | None = None
        video = rows[0]["video_path"]
        # Face crops from a folder: the frame rate is that of the video the audio comes from.
        if video is not None and Path(video).is_dir():
            video = rows[0]["audio_path"]
        if rows[0]["audio_path"] and video and any(r["start_frame"] is not None for r in rows):
            try:
                fps = audio_features.video_fps(video)
            except (FeatureError, OSError, audio_features.av.FFmpegError) as exc:
                for r in rows:
                    _quarantine(summary, r["sample_id"], f"cannot read the frame rate of {video}: {exc}")
                continue
        clips = [audio_features.AudioRequest(r["sample_id"], r["start_frame"], r["num_frames"]) for r in rows]
        for clip in audio_features.extract_audio_clips(media, clips, features, fps=fps):
            if isinstance(clip, audio_features.AudioFailure):
                _quarantine(summary, clip.sample_id, clip.reason)
                continue
            if clip.padded_s > 0:
                summary.audio_padded_s[clip.sample_id] = round(clip.padded_s, 4)
            if clip.silent:
                summary.silent.append(clip.sample_id)
            results[clip.sample_id] = {"sample_id": clip.sample_id, **encode_tensor("logmel", clip.logmel)}
    return results


# ---- driver -------------------------------------------------------------------------------------------------
def _validate(cfg: RunConfig, manifest: pd.DataFrame) -> None:
    if len(manifest) == 0:
        raise DatasetError("manifest: it has no rows (expected one row per sample)")
    if "sample_id" not in manifest.columns:
        raise DatasetError(f"manifest: no 'sample_id' column (columns: {list(manifest.columns)})")
    dup = manifest["sample_id"].astype(str).duplicated()
    if dup.any():
        raise DatasetError(
            f"manifest: sample_id {manifest['sample_id'][dup].iloc[0]!r} appears more than once"
        )
    for modality in cfg.data.modalities:
        if modality not in EXTRACTED_MODALITIES:
            raise ConfigError(
                f"data.modalities: {modality!r} cannot be extracted from recordings (expected one of {list(EXTRACTED_MODALITIES)}; "
                "use data.dataset 'table' for feature vectors)"
            )
        missing = [c for c in MODALITY_COLUMNS[modality] if c not in manifest.columns and c != "audio_path"]
        if missing:
            raise DatasetError(
                f"manifest: modality {modality!r} needs columns {missing} (columns: {list(manifest.columns)})"
            )
    if "video" in cfg.data.modalities:
        face_features.FaceDetector(cfg.features)  # a bad YuNet model fails here, before any work
    if "physio" in cfg.data.modalities:
        physio_features.check_settings(cfg.features, cfg.data.part)


def _sweep_temp_files(features_dir: Path) -> None:
    """Remove temp files a killed run left behind (``.<name>.tmp-<pid>``)."""
    if not features_dir.is_dir():
        return
    for tmp in features_dir.rglob(".*.tmp-*"):
        logger.info("removing the leftover temp file %s", tmp)
        tmp.unlink(missing_ok=True)


def _existing_summary(job: ShardJob) -> dict[str, Any] | None:
    if not job.path.is_file():
        return None
    try:
        meta = pq.read_schema(job.path).metadata or {}
        return _ShardSummary.from_json(meta[SHARD_META_KEY.encode()]).__dict__
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowInvalid) as exc:
        logger.warning("shard file %s is unreadable (%s); extracting it again", job.path, exc)
        return None


def _run_jobs(
    jobs: list[ShardJob], cfg: RunConfig, workers: int, use_ray: bool, progress: bool
) -> list[dict[str, Any]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    summaries: list[dict[str, Any]] = []
    with Progress(
        TextColumn("[bold]extract {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        totals: dict[str, int] = defaultdict(int)
        for job in jobs:
            totals[job.modality] += len(job.rows)
        tasks = {m: bar.add_task(f"{m} samples", total=n) for m, n in totals.items()}
        todo = []
        for job in jobs:
            done = _existing_summary(job)
            if done is not None:
                done["skipped"] = True
                summaries.append(done)
                bar.advance(tasks[job.modality], len(job.rows))
            else:
                todo.append(job)
        logger.info(
            "extract: %d shard jobs, %d already done, %d to run", len(jobs), len(jobs) - len(todo), len(todo)
        )
        report_progress("extract", len(summaries), len(jobs), "shards")

        def finished(job: ShardJob, summary: dict[str, Any]) -> None:
            summary["skipped"] = False
            summaries.append(summary)
            bar.advance(tasks[job.modality], len(job.rows))
            report_progress("extract", len(summaries), len(jobs), "shards")

        if not use_ray:
            for job in todo:
                finished(job, extract_shard(job, cfg.features))
            return summaries
        import ray

        remote = ray.remote(num_cpus=1)(extract_shard)
        features_ref = ray.put(cfg.features)
        queue = list(todo)
        in_flight: dict[Any, ShardJob] = {}
        while queue or in_flight:
            while queue and len(in_flight) < workers:
                job = queue.pop(0)
                in_flight[remote.remote(job, features_ref)] = job
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                job = in_flight.pop(ref)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    from pkdot.errors import InfrastructureError
                    from pkdot.ray_utils import is_infrastructure_error

                    for other in in_flight:
                        ray.cancel(other)
                    where = f"extraction of {job.modality} shard {job.index} ({job.path.name})"
                    # A worker crashed or was OOM-killed, a node died: retried by the flow, not bad input.
                    if is_infrastructure_error(exc):
                        raise InfrastructureError(
                            f"{where}: Ray infrastructure failure ({type(exc).__name__}); the shards written "
                            f"so far are kept, re-run to resume: {exc}"
                        ) from exc
                    raise FeatureError(f"{where} failed: {exc}") from exc
                finished(job, summary)
    return summaries


def _merge(jobs: list[ShardJob], modality: str, keep: set[str], out: Path, audio_frames: int | None) -> int:
    """Stream the shards of a modality into ``out`` (temp name), keeping the samples in ``keep``."""
    schema = MODALITY_SCHEMA[modality]
    keep_array = pa.array(sorted(keep), type=pa.string())
    written = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(out, schema) as writer:

        def flush(final: bool) -> None:
            nonlocal pending, pending_rows, written
            if not pending:
                return
            table = pa.concat_tables(pending)
            while table.num_rows >= ROW_GROUP_SIZE or (final and table.num_rows):
                head = table.slice(0, ROW_GROUP_SIZE)
                writer.write_table(head, row_group_size=ROW_GROUP_SIZE)
                written += head.num_rows
                table = table.slice(head.num_rows)
            pending, pending_rows = ([table], table.num_rows) if table.num_rows else ([], 0)

        for job in (j for j in jobs if j.modality == modality):
            pf = pq.ParquetFile(job.path)
            for batch in pf.iter_batches(batch_size=ROW_GROUP_SIZE):
                table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                table = table.filter(pc.is_in(table.column("sample_id"), value_set=keep_array))
                if table.num_rows == 0:
                    continue
                if modality == "audio" and audio_frames is not None:
                    table = _pad_audio(table, audio_frames)
                pending.append(table.cast(schema))
                pending_rows += table.num_rows
                if pending_rows >= ROW_GROUP_SIZE:
                    flush(final=False)
        flush(final=True)
    return written


def _pad_audio(table: pa.Table, frames: int) -> pa.Table:
    rows = table.to_pylist()
    for row in rows:
        shape = row["logmel_shape"]
        if shape[1] != frames:
            m = np.frombuffer(row["logmel"], dtype=np.dtype(row["logmel_dtype"])).reshape(shape)
            row.update(encode_tensor("logmel", audio_features.pad_logmel(m, frames)))
    return pa.Table.from_pylist(rows, schema=AUDIO_SCHEMA)


def _audio_frames(jobs: list[ShardJob], keep: set[str]) -> int | None:
    """The common T of the audio rows: the longest log-mel among the samples kept."""
    longest = None
    for job in (j for j in jobs if j.modality == "audio"):
        t = pq.read_table(job.path, columns=["sample_id", "logmel_shape"]).to_pydict()
        for sid, shape in zip(t["sample_id"], t["logmel_shape"], strict=True):
            if sid in keep:
                longest = shape[1] if longest is None else max(longest, shape[1])
    return longest


def _write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def run_extract(
    cfg: RunConfig,
    manifest: pd.DataFrame,
    run_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Extract the modalities ``cfg.data.modalities`` of every manifest row into ``run_dir/features/``.

    Parameters
    ----------
    cfg : the run configuration (``cfg.features`` settings, ``cfg.data`` modalities/part, ``cfg.ray_address``).
    manifest : one row per sample (:mod:`pkdot.data.manifest` columns).
    run_dir : the run directory; writes ``features/{faces,physio,audio}.parquet`` (or ``<column>.parquet``
        for table data), ``features/shards/`` and ``features/extract_report.json``.
    workers : shard tasks in flight (default ``cfg.features.workers``). Ray is used unless ``workers == 1``
        with no cluster address, in which case shards run in this process.
    progress : show a progress bar over samples.

    On a Ray cluster, the recordings and ``run_dir`` must be on storage every node sees (workers write the
    shard files themselves; only small summaries travel back to the driver).

    Returns
    -------
    The report dict (also written to ``extract_report.json``). Raises :class:`FeatureError` (after writing
    the report) when no sample has every modality.
    """
    run_dir = Path(run_dir).resolve()  # Ray workers may run in another directory
    features_dir = run_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    report_path = features_dir / REPORT_NAME
    report_path.unlink(missing_ok=True)
    _sweep_temp_files(features_dir)
    if cfg.data.dataset == "table":
        return _run_table(cfg, manifest, run_dir, progress)
    t_start = time.perf_counter()
    _validate(cfg, manifest)
    workers = int(workers or cfg.features.workers)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    use_ray = workers > 1 or bool(address)
    jobs = plan_shards(cfg, manifest, run_dir)
    started_ray = False
    if use_ray:
        from pkdot.ray_utils import ensure_ray

        started_ray = ensure_ray(num_cpus=workers, address=cfg.ray_address)
    try:
        summaries = _run_jobs(jobs, cfg, workers, use_ray, progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    t_extracted = time.perf_counter()

    modalities = list(cfg.data.modalities)
    ok: dict[str, set[str]] = {m: set() for m in modalities}
    for s in summaries:
        ok[s["modality"]].update(s["ok"])
    order = manifest["sample_id"].astype(str).tolist()
    keep = [sid for sid in order if all(sid in ok[m] for m in modalities)]
    keep_set = set(keep)
    report = _build_report(cfg, summaries, modalities, order, keep, workers, use_ray)
    if report["quarantined"]:  # on the driver: shards on Ray workers log their own lines only there
        first = report["quarantined"][0]
        logger.warning(
            "extract: %d sample(s) quarantined (first: %s, %s: %s); every reason is in %s",
            len(report["quarantined"]),
            first.get("sample_id"),
            first.get("modality"),
            first.get("reason"),
            report_path,
        )
    if not keep:
        report["time_s"] = {"total": round(time.perf_counter() - t_start, 3)}
        _write_report(report_path, report)
        raise FeatureError(
            f"extraction wrote no sample: none of the {len(order)} samples has every modality {modalities} "
            f"(see {report_path}; first reasons: {[q['reason'] for q in report['quarantined'][:3]]})"
        )
    audio_frames = _audio_frames(jobs, keep_set) if "audio" in modalities else None
    temps: dict[str, Path] = {}
    try:
        for modality in modalities:
            final = feature_path(run_dir, modality)
            temps[modality] = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            _merge(jobs, modality, keep_set, temps[modality], audio_frames)
        for modality, tmp in temps.items():
            tmp.replace(feature_path(run_dir, modality))
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    _remove_stale_shards(features_dir / "shards", jobs)
    if audio_frames is not None:
        report["audio"]["frames"] = audio_frames
    per_modality_time: dict[str, float] = defaultdict(float)
    for s in summaries:
        if not s.get("skipped"):
            per_modality_time[s["modality"]] += s["seconds"]
    report["time_s"] = {
        **{m: round(per_modality_time[m], 3) for m in modalities},
        "extract_wall": round(t_extracted - t_start, 3),
        "merge": round(time.perf_counter() - t_extracted, 3),
        "total": round(time.perf_counter() - t_start, 3),
    }
    report["tables"] = {m: str(feature_path(run_dir, m)) for m in modalities}
    _write_report(report_path, report)
    logger.info(
        "extract: wrote %d of %d samples (%d quarantined), face detection rate %s, shards done %d / skipped %d",
        len(keep),
        len(order),
        len(report["quarantined"]),
        report["face_detection_rate"],
        report["shards_done"],
        report["shards_skipped"],
    )
    return report


def _build_report(
    cfg: RunConfig,
    summaries: list[dict[str, Any]],
    modalities: list[str],
    order: list[str],
    keep: list[str],
    workers: int,
    use_ray: bool,
) -> dict[str, Any]:
    summaries = sorted(summaries, key=lambda s: (modalities.index(s["modality"]), s["index"]))
    quarantined = [q for s in summaries for q in s["quarantined"]]
    counts = {
        m: {
            "ok": sum(len(s["ok"]) for s in summaries if s["modality"] == m),
            "quarantined": sum(len(s["quarantined"]) for s in summaries if s["modality"] == m),
        }
        for m in modalities
    }
    keep_set = set(keep)
    failed_in: dict[str, list[str]] = defaultdict(list)
    for q in quarantined:
        failed_in[q["sample_id"]].append(q["modality"])
    not_written = [
        {"sample_id": sid, "failed_modalities": failed_in[sid]} for sid in order if sid not in keep_set
    ]
    sampled = sum(s["sampled_frames"] for s in summaries)
    detected = sum(s["detected_frames"] for s in summaries)
    lost = {sid: n for s in summaries for sid, n in s["lost_frames"].items()}
    quality = {sid: q for s in summaries for sid, q in s["quality"].items()}
    flag_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for per_channel in quality.values():
        for ch, q in per_channel.items():
            for flag in q["flags"]:
                flag_counts[ch][flag] += 1
    per_mod_shards = {
        m: {
            "total": sum(1 for s in summaries if s["modality"] == m),
            "done": sum(1 for s in summaries if s["modality"] == m and not s.get("skipped")),
            "skipped": sum(1 for s in summaries if s["modality"] == m and s.get("skipped")),
        }
        for m in modalities
    }
    return {
        "dataset": cfg.data.dataset,
        "modalities": modalities,
        "n_manifest": len(order),
        "n_written": len(keep),
        "counts": counts,
        "quarantined": quarantined,
        "not_written": not_written,
        "face_detection_rate": (detected / sampled) if sampled else None,
        "sampled_frames": sampled,
        "detected_frames": detected,
        "lost_frames": {"total": int(sum(lost.values())), "per_sample": lost},
        "physio_quality": {
            "flag_counts": {ch: dict(v) for ch, v in flag_counts.items()},
            "per_sample": quality,
        },
        "audio": {
            "padded_s": {sid: v for s in summaries for sid, v in s["audio_padded_s"].items()},
            "silent": [sid for s in summaries for sid in s["silent"]],
        },
        "shards_total": len(summaries),
        "shards_done": sum(v["done"] for v in per_mod_shards.values()),
        "shards_skipped": sum(v["skipped"] for v in per_mod_shards.values()),
        "shards": per_mod_shards,
        "shard_size": cfg.features.shard_size,
        "worker_peak_rss_mb": max((s.get("peak_rss_mb", 0.0) for s in summaries), default=0.0),
        "workers": workers,
        "ray": use_ray,
    }


def _remove_stale_shards(shards_dir: Path, jobs: list[ShardJob]) -> None:
    current = {job.path.resolve() for job in jobs}
    for path in shards_dir.glob("*/shard-*.parquet"):
        if path.resolve() not in current:
            logger.info("removing the stale shard %s", path)
            path.unlink(missing_ok=True)


# ---- bring-your-own feature table ---------------------------------------------------------------------------
def _vector_column_ok(field_type: pa.DataType) -> bool:
    if (
        pa.types.is_list(field_type)
        or pa.types.is_large_list(field_type)
        or pa.types.is_fixed_size_list(field_type)
    ):
        inner = field_type.value_type
        return pa.types.is_integer(inner) or pa.types.is_floating(inner)
    return pa.types.is_integer(field_type) or pa.types.is_floating(field_type)


def _as_vector(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    return np.atleast_1d(np.asarray(value, dtype=np.float64))


def _run_table(cfg: RunConfig, manifest: pd.DataFrame, run_dir: Path, progress: bool) -> dict:
    """Bring-your-own table: validate each modality column's vectors and write ``<column>.parquet``."""
    t_start = time.perf_counter()
    root = cfg.data.root
    if root is None or not Path(root).is_file():
        raise DatasetError(f"data.root {root}: a 'table' data set needs the path of a Parquet file")
    if len(manifest) == 0 or "sample_id" not in manifest.columns:
        raise DatasetError("manifest: expected a non-empty manifest with a 'sample_id' column")
    try:
        pf = pq.ParquetFile(root)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DatasetError(f"data.root {root} is not a readable Parquet file: {exc}") from exc
    schema = pf.schema_arrow
    modalities = list(cfg.data.modalities)
    if "sample_id" not in schema.names:
        raise DatasetError(f"{root}: no 'sample_id' column (columns: {schema.names})")
    for m in modalities:
        if m not in schema.names:
            raise DatasetError(f"{root}: no column {m!r} for modality {m!r} (columns: {schema.names})")
        if not _vector_column_ok(schema.field(m).type):
            raise DatasetError(
                f"{root}: column {m!r} has type {schema.field(m).type}; expected a list of numbers per row"
            )
    order = manifest["sample_id"].astype(str).tolist()
    wanted = set(order)
    seen: set[str] = set()
    lengths: dict[str, dict[str, int]] = {m: {} for m in modalities}
    reasons: dict[str, dict[str, str]] = {m: {} for m in modalities}
    for batch in pf.iter_batches(batch_size=ROW_GROUP_SIZE * 16, columns=["sample_id", *modalities]):
        d = batch.to_pydict()
        for i, sid in enumerate(map(str, d["sample_id"])):
            if sid not in wanted:
                continue
            if sid in seen:
                raise DatasetError(f"{root}: sample_id {sid!r} appears more than once")
            seen.add(sid)
            for m in modalities:
                v = _as_vector(d[m][i])
                if v is None or v.size == 0:
                    reasons[m][sid] = f"{root}: column {m!r} is empty for this sample"
                elif not np.isfinite(v).all():
                    reasons[m][sid] = (
                        f"{root}: column {m!r} has {int((~np.isfinite(v)).sum())} non-finite values"
                    )
                else:
                    lengths[m][sid] = v.size
    dims: dict[str, int] = {}
    for m in modalities:
        if lengths[m]:
            values, counts = np.unique(list(lengths[m].values()), return_counts=True)
            dims[m] = int(values[np.argmax(counts)])
            for sid, n in lengths[m].items():
                if n != dims[m]:
                    reasons[m][sid] = (
                        f"{root}: column {m!r} has {n} values for this sample, expected {dims[m]}"
                    )
        for sid in order:
            if sid not in seen:
                reasons[m][sid] = f"{root}: sample not in the table"
    ok = {m: {sid for sid in lengths[m] if sid not in reasons[m]} for m in modalities}
    keep = [sid for sid in order if all(sid in ok[m] for m in modalities)]
    keep_set = set(keep)
    summaries = [
        {
            **_ShardSummary(m, 0, "table", rows=len(order)).__dict__,
            "ok": sorted(ok[m]),
            "quarantined": [{"sample_id": sid, "modality": m, "reason": r} for sid, r in reasons[m].items()],
            "skipped": False,
        }
        for m in modalities
    ]
    report = _build_report(cfg, summaries, modalities, order, keep, workers=1, use_ray=False)
    report.update(
        {"shards_total": 0, "shards_done": 0, "shards_skipped": 0, "shards": {}, "vector_dims": dims}
    )
    report_path = run_dir / "features" / REPORT_NAME
    if not keep:
        _write_report(report_path, report)
        raise FeatureError(
            f"table {root}: no sample has valid vectors for every modality {modalities} (see {report_path})"
        )
    temps = {m: feature_path(run_dir, m).with_name(f".{m}.parquet.tmp-{os.getpid()}") for m in modalities}
    writers = {m: pq.ParquetWriter(temps[m], VECTOR_SCHEMA) for m in modalities}
    try:
        for batch in pf.iter_batches(batch_size=ROW_GROUP_SIZE, columns=["sample_id", *modalities]):
            d = batch.to_pydict()
            rows: dict[str, list[dict]] = {m: [] for m in modalities}
            for i, sid in enumerate(map(str, d["sample_id"])):
                if sid in keep_set:
                    for m in modalities:
                        vector = np.asarray(_as_vector(d[m][i]), dtype=np.float32)
                        rows[m].append({"sample_id": sid, **encode_tensor("vector", vector)})
            for m in modalities:
                if rows[m]:
                    writers[m].write_table(
                        pa.Table.from_pylist(rows[m], schema=VECTOR_SCHEMA), row_group_size=ROW_GROUP_SIZE
                    )
        for w in writers.values():
            w.close()
        for m in modalities:
            temps[m].replace(feature_path(run_dir, m))
    finally:
        for w in writers.values():
            w.close()
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    report["time_s"] = {"total": round(time.perf_counter() - t_start, 3)}
    report["tables"] = {m: str(feature_path(run_dir, m)) for m in modalities}
    _write_report(report_path, report)
    return report
