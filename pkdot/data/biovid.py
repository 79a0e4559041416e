"""Biovid Heat Pain (Part A / Part B) -> manifest.

Layout: ``samples.csv`` (``subject_id subject_name class_id class_name sample_id sample_name``),
``video/<subject_name>/<sample_name>.mp4``, ``biosignals_filtered/<subject_name>/<sample_name>_bio.csv``
(``time gsr ecg emg_trapezius [emg_corrugator emg_zygomaticus]``; header checked here), tab, comma or
semicolon separated; ``sample_id``/``subject_id`` = ``sample_name``/``subject_name``; ``binary`` keeps BL1 and
PA4. Face crops ``frames/<subject_name>/<sample_name>/<frame:05d>.jpg`` replace the videos with ``data.faces:
frames`` (or unset and ``frames/`` present)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pkdot.config import DataConfig
from pkdot.data.manifest import BIOVID_CLASSES, BadSamples, ManifestResult, manifest_frame, use_face_crops
from pkdot.errors import DatasetError
from pkdot.tables import sniff_delimiter

logger = logging.getLogger(__name__)

SAMPLES_COLUMNS = ["subject_id", "subject_name", "class_id", "class_name", "sample_id", "sample_name"]
#: Biosignal CSV columns per part.
BIO_COLUMNS = {
    "A": ["time", "gsr", "ecg", "emg_trapezius"],
    "B": ["time", "gsr", "ecg", "emg_trapezius", "emg_corrugator", "emg_zygomaticus"],
}
#: Per-sample face-crop folders: ``frames/<subject_name>/<sample_name>/<frame:05d>.jpg`` (1-based).
FRAMES_DIR = "frames"


def read_header(path: Path) -> tuple[list[str], str]:
    """The lower-cased column names of a delimited text file and its delimiter (tab, comma or semicolon)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        line = fh.readline()
    if not line.strip():
        raise DatasetError(f"{path}: the file is empty (expected a header line)")
    if (delimiter := sniff_delimiter(line)) is None:
        raise DatasetError(
            f"{path}: cannot find the column delimiter in the header {line.strip()!r} "
            "(expected tab-, comma- or semicolon-separated columns)"
        )
    return [c.strip().strip('"').lower() for c in line.rstrip("\r\n").split(delimiter)], delimiter


def read_samples_csv(path: Path) -> pd.DataFrame:
    """Read ``samples.csv`` as strings and check its header (always raises on a bad header)."""
    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist (expected the Biovid samples.csv with columns {SAMPLES_COLUMNS})"
        )
    header, delimiter = read_header(path)
    if missing := [c for c in SAMPLES_COLUMNS if c not in header]:
        raise DatasetError(f"{path}: missing columns {missing} (found {header}, expected {SAMPLES_COLUMNS})")
    try:
        df = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable delimited table: {exc}") from exc
    df.columns = [c.strip().strip('"').lower() for c in df.columns]
    df[SAMPLES_COLUMNS] = df[SAMPLES_COLUMNS].apply(lambda column: column.str.strip())
    if df.empty:
        raise DatasetError(f"{path}: no samples (expected one row per sample after the header)")
    return df


def _class_of(row: pd.Series, path: Path, line: int, bad: BadSamples) -> int | None:
    """The class id of a samples.csv row, or None (after reporting it) if it is not a valid Biovid class."""
    raw = row["class_id"]
    try:
        value = float(raw)
    except ValueError:
        problem = f"class_id {raw!r} is not a number (expected 0..4 = {BIOVID_CLASSES})"
    else:
        if value < 0 or value != int(value) or int(value) >= len(BIOVID_CLASSES):
            problem = f"class_id {raw!r} is not a Biovid class (expected 0..4 = {BIOVID_CLASSES})"
        elif row["class_name"].upper() != BIOVID_CLASSES[int(value)]:
            expected = BIOVID_CLASSES[int(value)]
            problem = f"class_name {row['class_name']!r} does not match class_id {int(value)} (expected {expected!r})"
        else:
            return int(value)
    bad.bad(path, row["sample_name"] or None, f"line {line}: {problem}")
    return None


def build_biovid_manifest(data: DataConfig, root: Path) -> ManifestResult:
    """Manifest of a Biovid root; raises :class:`DatasetError` on bad input (a bad sample is skipped and listed
    under ``data.skip_bad``; a missing root or a bad samples.csv header still raises)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Biovid root {root} is not a directory (expected samples.csv, video/, biosignals_filtered/)"
        )
    samples_path = root / "samples.csv"
    samples = read_samples_csv(samples_path)
    bad = BadSamples(data.skip_bad)
    want_video = "video" in data.modalities
    frames_root = root / FRAMES_DIR
    layout = "frames/<subject_name>/<sample_name>/<frame:05d>.jpg"
    use_frames = use_face_crops(data, f"Biovid root {root}", frames_root, layout)
    want_physio = "physio" in data.modalities
    bio_columns = BIO_COLUMNS[data.part]
    rows: list[dict] = []
    seen: set[str] = set()
    for i, row in samples.iterrows():
        line = int(i) + 2  # 1-based, after the header
        subject, sample = row["subject_name"], row["sample_name"]
        if not subject or not sample:
            bad.bad(samples_path, sample or None, f"line {line}: empty subject_name or sample_name")
            continue
        if (class_id := _class_of(row, samples_path, line, bad)) is None:
            continue
        if data.task == "binary" and class_id not in (0, len(BIOVID_CLASSES) - 1):
            continue
        if sample in seen:
            bad.bad(
                samples_path,
                sample,
                f"line {line}: sample_name appears more than once (expected unique names)",
            )
            continue
        record = {
            "sample_id": sample,
            "subject_id": subject,
            "label": int(class_id > 0) if data.task == "binary" else class_id,
            "class_name": BIOVID_CLASSES[class_id],
            "valence": float("nan"),
            "arousal": float("nan"),
            "partition": "",
            "dataset": "biovid",
        }
        if want_video:
            video = (
                frames_root / subject / sample if use_frames else root / "video" / subject / f"{sample}.mp4"
            )
            if not (video.is_dir() if use_frames else video.is_file()):
                what = "face-crop folder" if use_frames else "video"
                hint = "" if use_frames else " (expected an .mp4 file)"
                bad.bad(video, sample, f"the {what} of this samples.csv entry does not exist{hint}")
                continue
            record["video_path"] = str(video.resolve())
        if want_physio:
            bio = root / "biosignals_filtered" / subject / f"{sample}_bio.csv"
            if not bio.is_file():
                bad.bad(bio, sample, "the biosignal CSV of this samples.csv entry does not exist")
                continue
            try:
                header, _ = read_header(bio)
            except DatasetError as exc:
                bad.bad(bio, sample, str(exc).removeprefix(f"{bio}: "))
                continue
            missing = [c for c in bio_columns if c not in header]
            unknown = [c for c in header if c not in BIO_COLUMNS["B"]]
            if missing or unknown:
                bad.bad(
                    bio,
                    sample,
                    f"wrong columns {header}: missing {missing}, unknown {unknown} "
                    f"(expected Part {data.part} columns {bio_columns})",
                )
                continue
            record["physio_path"] = str(bio.resolve())
        seen.add(sample)
        rows.append(record)
    if not rows:
        raise DatasetError(
            f"Biovid root {root}: no usable samples for task {data.task!r}"
            + (f" ({len(bad.skipped)} skipped)" if bad.skipped else "")
        )
    return bad.result(manifest_frame(rows), f"Biovid part {data.part} ({data.task})")
