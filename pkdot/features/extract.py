"""Stage 1: feature extraction over a manifest, sharded on Ray, resumable, merged into aligned tables.

Each (modality, shard) task writes ``shard-<i>-<key>.parquet`` atomically, its summary in the file metadata;
the key hashes the rows, their recordings' identity, the settings and the extractor's code, so a re-run
redoes only changed shards. Shards merge into ``features/{faces,physio,audio}.parquet`` (the samples every
modality got); ``extract_report.json``, written last, marks a complete extraction. A ``table`` set's columns
become ``<column>.parquet`` (``vector`` float32 (D,)) with the same checks and report, without shards."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pkdot import rundir
from pkdot.config import FeatureConfig, RunConfig
from pkdot.errors import ConfigError, DatasetError, FeatureError
from pkdot.features import audio as audio_features
from pkdot.features import faces as face_features
from pkdot.features import physio as physio_features
from pkdot.features import schema
from pkdot.features.faces import ClipFailure, ClipRequest, face_side
from pkdot.features.schema import ROW_GROUP_SIZE, VECTOR_SCHEMA, encode_tensor, write_table_atomic
from pkdot.progress import report as report_progress
from pkdot.rundir import RunDir, atomic_path, atomic_write_json
from pkdot.tables import is_vector_type, modal_length, vector_lengths, vector_problem

logger = logging.getLogger(__name__)

SHARD_META_KEY = "pkdot_shard"
EXTRACTED_MODALITIES = ("video", "physio", "audio")
MODALITY_SCHEMA = {"video": schema.FACES_SCHEMA, "physio": schema.PHYSIO_SCHEMA, "audio": schema.AUDIO_SCHEMA}
#: Feature settings (FeatureConfig fields, space-separated) each extractor's output depends on.
MODALITY_SETTINGS = {
    "video": "n_frames crop_size face_margin detector yunet_model detect_width min_face_px detect_every "
    "box_smoothing",
    "physio": "physio_fs physio_channels physio_window max_nan_gap_s spec_nperseg spec_noverlap spec_nfft",
    "audio": "audio_sr n_mels hop_length",
}
#: The module (in ``pkdot/features/``, with ``schema.py``) whose code computes each modality's shard rows.
MODALITY_CODE = {"video": "faces.py", "physio": "physio.py", "audio": "audio.py"}
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
    durations: dict[str, tuple[str, float]] = field(default_factory=dict)  # sample -> (recording, seconds)
    peak_rss_mb: float = 0.0  # peak resident memory of the process that extracted the shard


# ---- planning -----------------------------------------------------------------------------------------------
def _shard_value(column: str, value: Any) -> int | str | None:
    """A manifest cell in a shard row: None, a frame number, or a path made absolute (on the driver)."""
    if pd.isna(value) or str(value) == "":
        return None
    if column in ("start_frame", "num_frames"):
        return int(value)
    return str(Path(str(value)).expanduser().absolute())


def _modality_settings(features: FeatureConfig, modality: str, part: str) -> dict[str, Any]:
    dump = features.model_dump(mode="json")
    settings = {k: dump[k] for k in MODALITY_SETTINGS[modality].split()}
    # The extractor's code: editing it re-extracts that modality's shards (not the others').
    package = rundir.PACKAGE_DIR  # read at call time (tests point it at an edited copy)
    code = [package / "features" / f for f in (MODALITY_CODE[modality], "schema.py")]
    settings["code"] = rundir.source_hash(code, package)
    if modality == "physio":
        settings["physio_channels"] = physio_features.resolve_channels(features, part)
    if modality == "video" and features.detector == "yunet":
        settings["yunet_stamp"] = rundir.file_identity(features.yunet_model)
    return settings


def shard_key(modality: str, rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """Hash of a shard: its rows, the :func:`pkdot.rundir.file_identity` of every recording they name, the settings."""
    paths = ("video_path", "physio_path", "audio_path")
    stamped = [
        {**row, "stamps": {c: rundir.file_identity(row[c]) for c in paths if c in row}} for row in rows
    ]
    return rundir.hash_json({"modality": modality, "settings": settings, "rows": stamped})


def plan_shards(cfg: RunConfig, manifest: pd.DataFrame, run_dir: Path) -> list[ShardJob]:
    """Cut the manifest into shards of ``features.shard_size`` rows, one job per (modality, shard)."""
    size = cfg.features.shard_size
    records = manifest.to_dict("records")
    jobs: list[ShardJob] = []
    for modality in cfg.data.modalities:
        settings = _modality_settings(cfg.features, modality, cfg.data.part)
        out_dir = RunDir(run_dir).shards(modality)
        for index, first in enumerate(range(0, len(records), size)):
            rows: list[dict[str, Any]] = [
                {"sample_id": str(rec["sample_id"])}
                | {col: _shard_value(col, rec.get(col)) for col in MODALITY_COLUMNS[modality]}
                for rec in records[first : first + size]
            ]
            key = shard_key(modality, rows, settings)
            path = out_dir / f"shard-{index:05d}-{key}.parquet"
            jobs.append(ShardJob(modality, index, rows, key, path, cfg.data.part))
    return jobs


# ---- per-shard extraction (runs in a Ray worker) ------------------------------------------------------------
def extract_shard(job: ShardJob, features: FeatureConfig) -> dict[str, Any]:
    """Extract one shard into its Parquet file; returns its summary (bad recordings are quarantined there)."""
    t0 = time.perf_counter()
    summary = _ShardSummary(job.modality, job.index, job.key, rows=len(job.rows))
    extract = {"video": _extract_faces_rows, "physio": _extract_physio_rows, "audio": _extract_audio_rows}
    results = extract[job.modality](job, features, summary)
    summary.ok = [row["sample_id"] for row in job.rows if row["sample_id"] in results]  # manifest order
    summary.seconds = time.perf_counter() - t0
    summary.peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    metadata = {SHARD_META_KEY: json.dumps(summary.__dict__)}
    write_table_atomic([results[s] for s in summary.ok], MODALITY_SCHEMA[job.modality], job.path, metadata)
    return summary.__dict__


def _quarantine(summary: _ShardSummary, sample_id: str, reason: str) -> None:
    logger.warning("quarantined %s (%s): %s", sample_id, summary.modality, reason)
    summary.quarantined.append({"sample_id": sample_id, "modality": summary.modality, "reason": reason})


def _by_recording(job: ShardJob, summary: _ShardSummary, columns: tuple[str, ...], missing: str) -> dict:
    """The shard's rows grouped by their recording paths ``columns``; rows with none are quarantined."""
    groups: dict[tuple, list[dict]] = {}
    for row in job.rows:
        if all(row[c] is None for c in columns):
            _quarantine(summary, row["sample_id"], f"the manifest gives {missing}")
        else:
            groups.setdefault(tuple(row[c] for c in columns), []).append(row)
    return groups


def _extract_faces_rows(job: ShardJob, features: FeatureConfig, summary: _ShardSummary) -> dict[str, dict]:
    detector = face_features.FaceDetector(features)
    results: dict[str, dict] = {}
    sources = []  # (video file or face-crop folder, its clips): extract_faces tells them apart
    for (path,), rows in _by_recording(job, summary, ("video_path",), "no video_path").items():
        clips = [
            ClipRequest(
                r["sample_id"], r["start_frame"] or 0, r["num_frames"], face_side(r["sample_id"], path)
            )
            for r in rows
        ]
        sources.append((path, clips))
    for path, clip in face_features.extract_faces(sources, features, detector):
        if isinstance(clip, ClipFailure):
            summary.sampled_frames += clip.sampled_frames
            _quarantine(summary, clip.sample_id, clip.reason)
            continue
        summary.sampled_frames += len(clip.detected)
        summary.detected_frames += int(clip.detected.sum())
        if clip.lost_frames:
            summary.lost_frames[clip.sample_id] = clip.lost_frames
        if clip.video_seconds is not None:
            summary.durations[clip.sample_id] = (path, clip.video_seconds)
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
        if flagged := {ch: q.as_dict() for ch, q in outcome.quality.items() if q.flags}:
            summary.quality[sid] = flagged
        if outcome.features is None:
            _quarantine(summary, sid, outcome.reason or "unknown physio failure")
            continue
        if outcome.seconds is not None:
            summary.durations[sid] = (row["physio_path"], outcome.seconds)
        f = outcome.features.__dict__
        results[sid] = (
            f | encode_tensor("window", f["window"]) | encode_tensor("spectrogram", f["spectrogram"])
        )
    return results


def _extract_audio_rows(job: ShardJob, features: FeatureConfig, summary: _ShardSummary) -> dict[str, dict]:
    results: dict[str, dict] = {}
    groups = _by_recording(job, summary, ("audio_path", "video_path"), "neither audio_path nor video_path")
    for (audio, video), rows in groups.items():
        media = audio or video
        fps: float | None = None
        # Face crops from a folder: the frame rate is that of the video the audio comes from.
        if video is not None and Path(video).is_dir():
            video = audio
        if audio and video and any(r["start_frame"] is not None for r in rows):
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
    if (dup := manifest["sample_id"].astype(str).duplicated()).any():
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


def _existing_summary(job: ShardJob) -> dict[str, Any] | None:
    if not job.path.is_file():
        return None
    try:
        meta = pq.read_schema(job.path).metadata or {}
        return _ShardSummary(**json.loads(meta[SHARD_META_KEY.encode()])).__dict__
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowInvalid) as exc:
        logger.warning("shard file %s is unreadable (%s); extracting it again", job.path, exc)
        return None


def _run_jobs(
    jobs: list[ShardJob], cfg: RunConfig, workers: int, use_ray: bool, progress: bool
) -> list[dict[str, Any]]:
    from rich import progress as rp

    summaries: list[dict[str, Any]] = []
    with rp.Progress(
        rp.TextColumn("[bold]extract {task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        rp.TimeRemainingColumn(),
        disable=not progress,
    ) as bar:
        totals = Counter(job.modality for job in jobs for _ in job.rows)
        tasks = {m: bar.add_task(f"{m} samples", total=n) for m, n in totals.items()}
        todo = []
        for job in jobs:
            if (done := _existing_summary(job)) is not None:
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

        from pkdot.scheduler import run_bounded

        remote = ray.remote(num_cpus=1)(extract_shard)
        features_ref = ray.put(cfg.features)
        run_bounded(
            todo,
            lambda job: remote.remote(job, features_ref),
            limit=workers,
            what="extraction",
            describe=lambda job: f"extraction of {job.modality} shard {job.index} ({job.path.name})",
            error=FeatureError,
            drain=False,
            on_result=finished,
        )
    return summaries


def _merge(jobs: list[ShardJob], modality: str, keep: set[str], out: Path, audio_frames: int | None) -> None:
    """Stream the shards of a modality into ``out``, keeping the samples in ``keep``, in row groups."""
    table_schema = MODALITY_SCHEMA[modality]
    keep_array = pa.array(sorted(keep), type=pa.string())
    pending = table_schema.empty_table()  # rows not written yet (fewer than a row group)
    with pq.ParquetWriter(out, table_schema) as writer:
        for job in (j for j in jobs if j.modality == modality):
            for batch in pq.ParquetFile(job.path).iter_batches(batch_size=ROW_GROUP_SIZE):
                table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                table = table.filter(pc.is_in(table.column("sample_id"), value_set=keep_array))
                if modality == "audio" and audio_frames is not None and table.num_rows:
                    table = _pad_audio(table, audio_frames)
                pending = pa.concat_tables([pending, table.cast(table_schema)])
                while pending.num_rows >= ROW_GROUP_SIZE:
                    writer.write_table(pending.slice(0, ROW_GROUP_SIZE), row_group_size=ROW_GROUP_SIZE)
                    pending = pending.slice(ROW_GROUP_SIZE)
        if pending.num_rows:
            writer.write_table(pending, row_group_size=ROW_GROUP_SIZE)


def _pad_audio(table: pa.Table, frames: int) -> pa.Table:
    rows = table.to_pylist()
    for row in rows:
        shape = row["logmel_shape"]
        if shape[1] != frames:
            m = np.frombuffer(row["logmel"], dtype=np.dtype(row["logmel_dtype"])).reshape(shape)
            row.update(encode_tensor("logmel", audio_features.pad_logmel(m, frames)))
    return pa.Table.from_pylist(rows, schema=MODALITY_SCHEMA["audio"])


def _audio_frames(jobs: list[ShardJob], keep: set[str]) -> int | None:
    """The common T of the audio rows: the longest log-mel among the samples kept."""
    lengths = [
        row["logmel_shape"][1]
        for job in jobs
        if job.modality == "audio"
        for row in pq.read_table(job.path, columns=["sample_id", "logmel_shape"]).to_pylist()
        if row["sample_id"] in keep
    ]
    return max(lengths, default=None)


def run_extract(
    cfg: RunConfig,
    manifest: pd.DataFrame,
    run_dir: Path,
    *,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Extract ``cfg.data.modalities`` of every manifest row into ``run_dir/features/``; returns the report
    (also in ``extract_report.json``; raises :class:`FeatureError` after writing it when no sample has every
    modality). ``workers``: shard tasks in flight (default ``features.workers``); with 1 and no cluster
    address the shards run here, else on Ray (recordings and ``run_dir`` on storage every node sees)."""
    run_dir = Path(run_dir).resolve()  # Ray workers may run in another directory
    rd = RunDir(run_dir)
    rd.features.mkdir(parents=True, exist_ok=True)
    report_path = rd.extract_report
    report_path.unlink(missing_ok=True)
    rundir.remove_temp_files(rd.features)
    if cfg.data.dataset == "table":
        return _run_table(cfg, manifest, rd)
    t_start = time.perf_counter()
    _validate(cfg, manifest)
    workers = int(workers or cfg.features.workers)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    use_ray = workers > 1 or bool(cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    jobs = plan_shards(cfg, manifest, run_dir)
    if use_ray:  # the whole machine (shards run `workers` at a time); left up for the training stages
        from pkdot.ray_utils import ensure_ray

        ensure_ray(num_cpus=None, address=cfg.ray_address)
    summaries = _run_jobs(jobs, cfg, workers, use_ray, progress)
    t_extracted = time.perf_counter()
    _check_durations(cfg, summaries)

    modalities = list(cfg.data.modalities)
    order = manifest["sample_id"].astype(str).tolist()
    report, keep = _build_report(cfg, summaries, order, workers, use_ray)
    # on the driver: shards on Ray workers log their own lines only there
    if quarantined := report["quarantined"]:
        first = "{sample_id}, {modality}: {reason}".format(**quarantined[0])
        logger.warning(
            "extract: %d sample(s) quarantined (first: %s); every reason is in %s",
            len(quarantined),
            first,
            report_path,
        )
    if not keep:
        report["time_s"] = {"total": round(time.perf_counter() - t_start, 3)}
        atomic_write_json(report_path, report, indent=2)
        raise FeatureError(
            f"extraction wrote no sample: none of the {len(order)} samples has every modality {modalities} "
            f"(see {report_path}; first reasons: {[q['reason'] for q in report['quarantined'][:3]]})"
        )
    audio_frames = _audio_frames(jobs, keep) if "audio" in modalities else None
    with contextlib.ExitStack() as tables:  # every table is renamed into place only when all are merged
        for modality in modalities:
            tmp = tables.enter_context(atomic_path(rd.feature_table(modality)))
            _merge(jobs, modality, keep, tmp, audio_frames)
    current = {job.path.resolve() for job in jobs}
    for path in rd.shards().glob("*/shard-*.parquet"):
        if path.resolve() not in current:
            logger.info("removing the stale shard %s", path)
            path.unlink(missing_ok=True)
    if audio_frames is not None:
        report["audio"]["frames"] = audio_frames
    busy = [s for s in summaries if not s.get("skipped")]
    report["time_s"] = {
        **{m: round(sum((s["seconds"] for s in busy if s["modality"] == m), 0.0), 3) for m in modalities},
        "extract_wall": round(t_extracted - t_start, 3),
        "merge": round(time.perf_counter() - t_extracted, 3),
        "total": round(time.perf_counter() - t_start, 3),
    }
    report["tables"] = {m: str(rd.feature_table(m)) for m in modalities}
    atomic_write_json(report_path, report, indent=2)
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


def _check_durations(cfg: RunConfig, summaries: list[dict[str, Any]]) -> None:
    """Quarantine (in the summaries) the samples whose recordings are much shorter than the sample's window
    (Biovid: ``features.biovid_window_s``) or whose video and biosignal file disagree in duration by more than
    ``features.duration_tolerance_s``. Runs on the driver, so a new tolerance re-extracts nothing."""
    tolerance = cfg.features.duration_tolerance_s
    window = cfg.features.biovid_window_s if cfg.data.dataset == "biovid" else None
    found: dict[str, dict[str, tuple[dict[str, Any], str, float]]] = defaultdict(dict)
    for s in summaries:
        for sid, (path, seconds) in s.get("durations", {}).items():
            if sid in s["ok"]:
                found[sid][s["modality"]] = (s, path, seconds)
    noun = {"video": "video", "physio": "biosignal file"}
    for sid, recordings in found.items():
        problems: dict[str, str] = {}
        for modality, (_, path, seconds) in recordings.items():
            if window is not None and seconds < window - tolerance:
                problems[modality] = (
                    f"{noun[modality]} {path} lasts {seconds:.3g} s, shorter than the sample's {window:g} s "
                    f"window (features.biovid_window_s; features.duration_tolerance_s {tolerance:g} s)"
                )
        if not problems and {"video", "physio"} <= recordings.keys():
            (_, video, v_s), (_, bio, b_s) = recordings["video"], recordings["physio"]
            if abs(v_s - b_s) > tolerance:
                problems["video"] = (
                    f"video {video} lasts {v_s:.3g} s but biosignal file {bio} lasts {b_s:.3g} s "
                    f"(they differ by more than features.duration_tolerance_s {tolerance:g} s)"
                )
        for modality, reason in problems.items():
            summary = recordings[modality][0]
            summary["ok"].remove(sid)
            summary["quarantined"].append({"sample_id": sid, "modality": modality, "reason": reason})
            logger.warning("quarantined %s (%s): %s", sid, modality, reason)


def _build_report(
    cfg: RunConfig, summaries: list[dict[str, Any]], order: list[str], workers: int = 1, use_ray: bool = False
) -> tuple[dict[str, Any], set[str]]:
    """The extraction report and the samples that every modality extracted."""
    modalities = list(cfg.data.modalities)
    summaries = sorted(summaries, key=lambda s: (modalities.index(s["modality"]), s["index"]))
    by_modality = {m: [s for s in summaries if s["modality"] == m] for m in modalities}
    ok = {m: {sid for s in group for sid in s["ok"]} for m, group in by_modality.items()}
    keep = {sid for sid in order if all(sid in ok[m] for m in modalities)}
    quarantined = [q for s in summaries for q in s["quarantined"]]
    failed_in: dict[str, list[str]] = defaultdict(list)
    for q in quarantined:
        failed_in[q["sample_id"]].append(q["modality"])
    sampled = sum(s["sampled_frames"] for s in summaries)
    detected = sum(s["detected_frames"] for s in summaries)
    lost = {sid: n for s in summaries for sid, n in s["lost_frames"].items()}
    quality = {sid: q for s in summaries for sid, q in s["quality"].items()}
    flag_counts: dict[str, Counter] = defaultdict(Counter)
    for per_channel in quality.values():
        for ch, q in per_channel.items():
            flag_counts[ch].update(q["flags"])
    skipped = {m: sum(bool(s.get("skipped")) for s in g) for m, g in by_modality.items()}
    shards = {
        m: {"total": len(g), "done": len(g) - skipped[m], "skipped": skipped[m]}
        for m, g in by_modality.items()
    }
    report = {
        "dataset": cfg.data.dataset,
        "modalities": modalities,
        "n_manifest": len(order),
        "n_written": len(keep),
        "counts": {
            m: {"ok": sum(len(s["ok"]) for s in g), "quarantined": sum(len(s["quarantined"]) for s in g)}
            for m, g in by_modality.items()
        },
        "quarantined": quarantined,
        "not_written": [
            {"sample_id": sid, "failed_modalities": failed_in[sid]} for sid in order if sid not in keep
        ],
        "face_detection_rate": (detected / sampled) if sampled else None,
        "sampled_frames": sampled,
        "detected_frames": detected,
        "lost_frames": {"total": int(sum(lost.values())), "per_sample": lost},
        "physio_quality": {"flag_counts": flag_counts, "per_sample": quality},
        "audio": {
            "padded_s": {sid: v for s in summaries for sid, v in s["audio_padded_s"].items()},
            "silent": [sid for s in summaries for sid in s["silent"]],
        },
        "shards_total": len(summaries),
        "shards_done": sum(v["done"] for v in shards.values()),
        "shards_skipped": sum(v["skipped"] for v in shards.values()),
        "shards": shards,
        "shard_size": cfg.features.shard_size,
        "worker_peak_rss_mb": max((s.get("peak_rss_mb", 0.0) for s in summaries), default=0.0),
        "workers": workers,
        "ray": use_ray,
    }
    return report, keep


# ---- bring-your-own feature table ---------------------------------------------------------------------------
def _run_table(cfg: RunConfig, manifest: pd.DataFrame, rd: RunDir) -> dict:
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
    columns = pf.schema_arrow
    modalities = list(cfg.data.modalities)
    if "sample_id" not in columns.names:
        raise DatasetError(f"{root}: no 'sample_id' column (columns: {columns.names})")
    for m in modalities:
        if m not in columns.names:
            raise DatasetError(f"{root}: no column {m!r} for modality {m!r} (columns: {columns.names})")
        if not is_vector_type(columns.field(m).type):
            raise DatasetError(
                f"{root}: column {m!r} has type {columns.field(m).type}; expected a list of numbers per row"
            )
    order = manifest["sample_id"].astype(str).tolist()
    ids = pf.read(columns=["sample_id"]).column("sample_id").to_pandas().astype(str)
    if ids.duplicated().any():
        raise DatasetError(f"{root}: sample_id {ids[ids.duplicated()].iloc[0]!r} appears more than once")
    row_of = dict(zip(ids, range(len(ids)), strict=True))
    at = np.array([row_of.get(sid, -1) for sid in order])
    dims: dict[str, int] = {}
    reasons: dict[str, dict[str, str]] = {m: {} for m in modalities}
    for m in modalities:
        lengths, nonfinite = vector_lengths(pf.read(columns=[m]).column(m))
        dims[m] = modal_length(root, m, lengths[at[at >= 0]])
        for sid, i in zip(order, at, strict=True):
            problem = (
                vector_problem(lengths[i], nonfinite[i], dims[m]) if i >= 0 else "sample not in the table"
            )
            if problem:
                reasons[m][sid] = f"{root}: column {m!r}: {problem}"
    summaries = [
        {
            **_ShardSummary(m, 0, "table", rows=len(order)).__dict__,
            "ok": [sid for sid in order if sid not in reasons[m]],
            "quarantined": [{"sample_id": sid, "modality": m, "reason": r} for sid, r in reasons[m].items()],
            "skipped": False,
        }
        for m in modalities
    ]
    report, keep = _build_report(cfg, summaries, order)
    report |= {"shards_total": 0, "shards_done": 0, "shards_skipped": 0, "shards": {}, "vector_dims": dims}
    report_path = rd.extract_report
    if not keep:
        atomic_write_json(report_path, report, indent=2)
        raise FeatureError(
            f"table {root}: no sample has valid vectors for every modality {modalities} (see {report_path})"
        )
    with contextlib.ExitStack() as tables:  # each writer is closed before its table is renamed into place
        writers = {
            m: tables.enter_context(
                pq.ParquetWriter(tables.enter_context(atomic_path(rd.feature_table(m))), VECTOR_SCHEMA)
            )
            for m in modalities
        }
        for batch in pf.iter_batches(batch_size=ROW_GROUP_SIZE, columns=["sample_id", *modalities]):
            d = batch.to_pydict()
            kept = [(i, sid) for i, sid in enumerate(map(str, d["sample_id"])) if sid in keep]
            for m in modalities:
                rows = [
                    {"sample_id": sid, **encode_tensor("vector", np.asarray(d[m][i], np.float32))}
                    for i, sid in kept
                ]
                if rows:
                    table = pa.Table.from_pylist(rows, schema=VECTOR_SCHEMA)
                    writers[m].write_table(table, row_group_size=ROW_GROUP_SIZE)
    report["time_s"] = {"total": round(time.perf_counter() - t_start, 3)}
    report["tables"] = {m: str(rd.feature_table(m)) for m in modalities}
    atomic_write_json(report_path, report, indent=2)
    return report
