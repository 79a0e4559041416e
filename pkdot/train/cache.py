"""Stage 3: the frozen-teacher embedding cache.

Each frozen teacher runs once over its fold's samples and writes ``<run>/embeddings/fold-<k>-seed-<s>.parquet``:
``sample_id``, the teacher embedding (D,), the teacher logits/outputs (C,) and — the paper freezes the
student's video backbone — the student's frozen video-backbone tokens (N, D). The file's metadata records the
hashes of the teacher and T-Net checkpoints it came from; the distill stage refuses a cache whose hashes do not
match the checkpoints (:class:`~pkdot.errors.StaleCacheError`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pkdot.config import RunConfig
from pkdot.errors import StageError, StaleCacheError
from pkdot.features.schema import encode_tensor, tensor_fields
from pkdot.train.data import SampleSet
from pkdot.train.jobs import file_hash

log = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        *tensor_fields("teacher_embedding"),
        *tensor_fields("teacher_logits"),
        *tensor_fields("video_tokens"),
    ]
)


def cache_path(run_dir: Path, fold: int, seed: int) -> Path:
    return Path(run_dir) / "embeddings" / f"fold-{fold}-seed-{seed}.parquet"


def teacher_dir(run_dir: Path, fold: int, seed: int) -> Path:
    return Path(run_dir) / "teacher" / f"fold-{fold}" / f"seed-{seed}"


def checkpoint_hashes(job_dir: Path) -> dict[str, str]:
    out = {}
    for name in ("teacher", "tnet"):
        path = Path(job_dir) / f"{name}.pt"
        if not path.is_file():
            raise StageError(f"{path} does not exist (run `pkdot train-teacher` first)")
        out[f"{name}_hash"] = file_hash(path)
    return out


@torch.no_grad()
def build_cache(
    cfg: RunConfig,
    samples: SampleSet,
    fold: int,
    seed: int,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> Path:
    """Run the frozen teacher of (fold, seed) over ``samples`` and write the cache file atomically."""
    from pkdot.train.teacher import load_teacher

    run_dir = Path(cfg.run_dir)
    jdir = teacher_dir(run_dir, fold, seed)
    hashes = checkpoint_hashes(jdir)
    teacher, _tnets, _shapes = load_teacher(cfg, jdir, device)
    video = cfg.data.student_modalities[0]
    rows = []
    for start in range(0, len(samples), batch_size):
        index = np.arange(start, min(len(samples), start + batch_size))
        inputs = {
            m: torch.from_numpy(np.ascontiguousarray(samples.arrays[m][index])).to(device)
            for m in cfg.data.modalities
        }
        out = teacher(inputs)
        tokens = out.tokens[video] if video in out.tokens else teacher.backbones[video](inputs[video])
        for i, j in enumerate(index):
            rows.append(
                {
                    "sample_id": samples.sample_ids[j],
                    **encode_tensor("teacher_embedding", out.embedding[i].float().cpu().numpy()),
                    **encode_tensor("teacher_logits", out.logits[i].float().cpu().numpy()),
                    **encode_tensor("video_tokens", tokens[i].float().cpu().numpy()),
                }
            )
    table = pa.Table.from_pylist(rows, schema=CACHE_SCHEMA)
    meta = {"fold": fold, "seed": seed, **hashes}
    table = table.replace_schema_metadata({b"pkdot": json.dumps(meta).encode()})
    path = cache_path(run_dir, fold, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=256)
    tmp.replace(path)
    return path


def cache_metadata(path: Path) -> dict:
    if not Path(path).is_file():
        raise StageError(f"embedding cache {path} does not exist (run `pkdot cache` first)")
    meta = pq.read_schema(path).metadata or {}
    if b"pkdot" not in meta:
        raise StaleCacheError(f"embedding cache {path} has no pkdot metadata; rebuild it with `pkdot cache`")
    return json.loads(meta[b"pkdot"])


def check_cache(run_dir: Path, fold: int, seed: int) -> dict:
    """Raise :class:`StaleCacheError` unless the cache of (fold, seed) matches the teacher checkpoints."""
    path = cache_path(run_dir, fold, seed)
    meta = cache_metadata(path)
    current = checkpoint_hashes(teacher_dir(run_dir, fold, seed))
    for key, value in current.items():
        if meta.get(key) != value:
            raise StaleCacheError(
                f"embedding cache {path} was built from a different {key.split('_')[0]} checkpoint "
                f"({meta.get(key)} != {value}); rebuild it with `pkdot cache` (the teacher was retrained)"
            )
    return meta


def cache_is_fresh(run_dir: Path, fold: int, seed: int) -> bool:
    try:
        check_cache(run_dir, fold, seed)
    except (StaleCacheError, StageError):
        return False
    return True


def read_cache(run_dir: Path, fold: int, seed: int, sample_ids: list[str]) -> dict[str, np.ndarray]:
    """The cached arrays of (fold, seed) for ``sample_ids`` (checked against the teacher first)."""
    from pkdot.features.schema import read_tensors

    check_cache(run_dir, fold, seed)
    path = cache_path(run_dir, fold, seed)
    return {
        col: read_tensors(path, col, sample_ids)[1]
        for col in ("teacher_embedding", "teacher_logits", "video_tokens")
    }
