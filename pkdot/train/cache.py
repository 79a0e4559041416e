"""Stage 3: the frozen-teacher embedding cache, ``<run>/embeddings/fold-<k>-seed-<s>[-crossfit<J>].parquet``.

Per sample: the teacher embedding (D,) and logits (C,), ``target_group`` (the crossfit group whose teacher gave
the targets, -1 for the full-fold teacher) and the full-fold teacher's video-backbone tokens (N, D). The metadata
records the hashes of the source checkpoints; a cache that does not match them is refused (``StaleCacheError``).
Cross-fitted targets: a training sample of group j gets the targets of the teacher trained *without* group j.
``distill.teacher_source = "privileged"``: embeddings and logits from ``unimodal-<p>`` (tokens from the teacher)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pkdot.config import RunConfig
from pkdot.errors import StageError, StaleCacheError
from pkdot.features.schema import encode_tensor, read_tensors, tensor_fields
from pkdot.folds import Fold, crossfit_groups_of, load_fold_plan
from pkdot.rundir import DONE, RunDir, atomic_write_parquet, content_hash
from pkdot.train.data import SampleSet, load_samples
from pkdot.train.loops import Amp, predict
from pkdot.train.teacher import load_teacher, load_unimodal

CACHE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        *tensor_fields("teacher_embedding"),
        *tensor_fields("teacher_logits"),
        pa.field("target_group", pa.int32()),
        *tensor_fields("video_tokens"),
    ]
)

#: The cached arrays read by default (``target_group`` too where the file has it).
CACHE_COLUMNS = ("teacher_embedding", "teacher_logits", "video_tokens")


def target_checkpoints(source: str, privileged: str | None) -> tuple[str, ...]:
    """The checkpoints (besides ``teacher``/``tnet``) whose outputs a cache holds: ``("unimodal-<p>",)`` for
    ``distill.teacher_source = "privileged"``."""
    if source == "fusion":
        return ()
    if source != "privileged" or not privileged:
        raise StaleCacheError(f"unknown teacher source {source!r} (privileged modality {privileged!r})")
    return (f"unimodal-{privileged}",)


def _teacher_file(path: Path) -> Path:
    if not path.is_file():
        raise StageError(f"{path} does not exist (run `pkdot train-teacher` first)")
    return path


def checkpoint_hashes(job_dir: Path, names: tuple[str, ...] = ("teacher", "tnet")) -> dict[str, str]:
    return {f"{name}_hash": content_hash(_teacher_file(Path(job_dir) / f"{name}.pt")) for name in names}


def job_record(job_dir: Path) -> dict:
    """A finished teacher job's ``DONE.json`` (hashes, seconds, the subjects it trained on)."""
    return json.loads(_teacher_file(Path(job_dir) / DONE).read_text())


def _outputs(
    cfg: RunConfig, model, samples: SampleSet, rows: np.ndarray, batch: int, amp: Amp, modality: str = ""
) -> tuple[np.ndarray, ...]:
    """(embeddings (n, D), logits (n, C), student-modality tokens (n, N, D)) of the fusion teacher ``model`` on
    ``rows``; (embeddings, logits) only of the ``modality`` unimodal model."""
    video = cfg.data.student_modalities[0]

    @amp.wrap
    def forward(idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        if modality:
            out = model(amp.tensor(samples.arrays[modality][rows[idx]]))
            return out.embedding, out.logits
        inputs = {m: amp.tensor(samples.arrays[m][rows[idx]]) for m in cfg.data.modalities}
        out = model(inputs)
        tokens = out.tokens[video] if video in out.tokens else model.backbones[video](inputs[video])
        return out.embedding, out.logits, tokens

    return predict(forward, len(rows), batch)


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
    """Run the frozen teacher(s) of (fold, seed) over ``samples`` and write the cache file atomically."""
    run = RunDir(cfg.run_dir)
    groups = crossfit_groups_of(cfg)
    source = cfg.distill.teacher_source
    privileged = cfg.data.privileged_modalities[0] if source == "privileged" else ""
    extra = target_checkpoints(source, privileged)
    jdir = run.teacher(fold, seed)
    hashes = checkpoint_hashes(jdir, ("teacher", "tnet", *extra))
    teacher, _tnets, _shapes = load_teacher(cfg, jdir, device)
    amp = Amp.of(cfg.train.precision, device)
    everything = np.arange(len(samples))
    embedding, logits, tokens = _outputs(cfg, teacher, samples, everything, batch_size, amp)
    meta: dict = {"fold": fold, "seed": seed, "teacher_targets": "fit", "teacher_source": source, **hashes}
    if privileged:
        model = load_unimodal(cfg, jdir, privileged, device)
        embedding, logits = _outputs(cfg, model, samples, everything, batch_size, amp, privileged)
        meta["privileged"] = privileged
    target_group = np.full(len(samples), -1, dtype=np.int32)
    if groups is not None:
        subjects = np.asarray(samples.subject_ids, dtype=object)
        records = []
        for j, members in enumerate(load_fold_plan(run.splits).fold(seed, fold).crossfit):
            gdir = run.teacher(fold, seed, j, groups)
            record = job_record(gdir)
            trained_on = set(record.get("train_subjects", []))
            if trained_on & set(members):
                raise StageError(
                    f"{gdir}: the teacher for crossfit group {j} was trained on its subjects "
                    f"{sorted(trained_on & set(members))[:5]} (stale teacher; rerun train-teacher)"
                )
            rows = np.flatnonzero(np.isin(subjects, np.asarray(members, dtype=object)))
            if not privileged:
                model = load_teacher(cfg, gdir, device, with_tnets=False)[0]
            else:
                model = load_unimodal(cfg, gdir, privileged, device)
            e, lg = _outputs(cfg, model, samples, rows, batch_size, amp, privileged)[:2]
            embedding[rows], logits[rows], target_group[rows] = e, lg, j
            records.append(
                {
                    "group": j,
                    "subjects": list(members),
                    "teacher_train_subjects": sorted(trained_on),
                    "seconds": float(record.get("seconds", float("nan"))),
                    **checkpoint_hashes(gdir, ("teacher", *extra)),
                }
            )
        meta |= {
            "teacher_targets": "crossfit",
            "crossfit_groups": groups,
            "groups": records,
            "extra_teacher_jobs": len(records),
            "extra_teacher_seconds": round(sum(r["seconds"] for r in records), 2),
        }
    tensors = {"teacher_embedding": embedding, "teacher_logits": logits, "video_tokens": tokens}
    rows_out = [
        {"sample_id": sid, "target_group": int(target_group[i])}
        | {k: v for name, a in tensors.items() for k, v in encode_tensor(name, a[i]).items()}
        for i, sid in enumerate(samples.sample_ids)
    ]
    table = pa.Table.from_pylist(rows_out, schema=CACHE_SCHEMA)
    table = table.replace_schema_metadata({b"pkdot": json.dumps(meta).encode()})
    path = run.cache(fold, seed, groups)
    atomic_write_parquet(table, path, row_group_size=256)
    return path


def build_stale_caches(cfg: RunConfig, pairs: Iterable[tuple[int, Fold]]) -> tuple[list[Path], int]:
    """Build the caches of the ``(seed, fold)`` pairs that are not fresh for their teacher (the samples loaded
    once); every pair's cache path and how many were built."""
    run = RunDir(cfg.run_dir)
    crossfit = crossfit_groups_of(cfg)
    samples, paths, built = None, [], 0
    for s, f in pairs:
        paths.append(run.cache(f.index, s, crossfit))
        if cache_is_fresh(run.root, f.index, s, crossfit, cfg.distill.teacher_source):
            continue
        if samples is None:
            samples = load_samples(cfg, run.root)
        build_cache(cfg, samples, f.index, s)
        built += 1
    return paths, built


def cache_metadata(path: Path) -> dict:
    if not Path(path).is_file():
        raise StageError(f"embedding cache {path} does not exist (run `pkdot cache` first)")
    meta = pq.read_schema(path).metadata or {}
    if b"pkdot" not in meta:
        raise StaleCacheError(f"embedding cache {path} has no pkdot metadata; rebuild it with `pkdot cache`")
    return json.loads(meta[b"pkdot"])


def check_cache(
    run_dir: Path, fold: int, seed: int, crossfit: int | None = None, teacher_source: str | None = None
) -> dict:
    """Raise :class:`StaleCacheError` unless the cache of (fold, seed) matches the teacher checkpoints (with
    ``crossfit`` = J, its J group teachers' too) and, when given, ``distill.teacher_source``."""
    run = RunDir(run_dir)
    path = run.cache(fold, seed, crossfit)
    meta = cache_metadata(path)
    built_from = meta.get("teacher_source", "fusion")
    if teacher_source is not None and built_from != teacher_source:
        raise StaleCacheError(
            f"embedding cache {path} holds the {built_from!r} teacher's targets, distill.teacher_source is "
            f"{teacher_source!r}; rebuild it with `pkdot cache`"
        )
    extra = target_checkpoints(built_from, meta.get("privileged"))
    jdir = run.teacher(fold, seed)
    expected = [(jdir, checkpoint_hashes(jdir, ("teacher", "tnet", *extra)), meta)]
    if crossfit is not None:
        records = meta.get("groups", [])
        if meta.get("crossfit_groups") != crossfit or len(records) != crossfit:
            raise StaleCacheError(
                f"embedding cache {path} is not a {crossfit}-group crossfit cache; rebuild it with `pkdot cache`"
            )
        for r in records:
            gdir = run.teacher(fold, seed, r["group"], crossfit)
            expected.append((gdir, checkpoint_hashes(gdir, ("teacher", *extra)), r))
    for jdir, current, recorded in expected:
        for key, value in current.items():
            if recorded.get(key) != value:
                raise StaleCacheError(
                    f"embedding cache {path} was built from a different {key.split('_')[0]} checkpoint of "
                    f"{jdir} ({recorded.get(key)} != {value}); rebuild it with `pkdot cache` (the teacher was "
                    "retrained)"
                )
    return meta


def cache_is_fresh(
    run_dir: Path, fold: int, seed: int, crossfit: int | None = None, teacher_source: str | None = None
) -> bool:
    try:
        check_cache(run_dir, fold, seed, crossfit, teacher_source)
    except (StaleCacheError, StageError):
        return False
    return True


def read_cache(
    run_dir: Path,
    fold: int,
    seed: int,
    sample_ids: list[str],
    crossfit: int | None = None,
    columns: tuple[str, ...] = CACHE_COLUMNS,
) -> dict[str, np.ndarray]:
    """The cached arrays of (fold, seed) for ``sample_ids`` (checked against the teacher(s) first); ``columns``
    may include ``target_group`` ((n,) int32)."""
    check_cache(run_dir, fold, seed, crossfit)
    path = RunDir(run_dir).cache(fold, seed, crossfit)
    out = {}
    for col in columns:
        if col == "target_group":
            groups = pq.read_table(path, columns=["sample_id", col]).to_pandas().set_index("sample_id")[col]
            if missing := [s for s in sample_ids if s not in groups.index]:
                raise StageError(f"embedding cache {path} has no rows for samples {missing[:5]}")
            out[col] = groups.loc[sample_ids].to_numpy(dtype=np.int32)
        else:
            out[col] = read_tensors(path, col, sample_ids)[1]
    return out


def crossfit_cost(paths: list[Path]) -> dict[str, float]:
    """The extra teacher jobs and their seconds recorded in cross-fitted caches (empty for fit caches)."""
    metas = [cache_metadata(p) for p in paths if Path(p).is_file()]
    metas = [m for m in metas if m.get("teacher_targets") == "crossfit"]
    if not metas:
        return {}
    return {
        "crossfit_teacher_jobs": int(sum(m["extra_teacher_jobs"] for m in metas)),
        "crossfit_teacher_seconds": round(float(sum(m["extra_teacher_seconds"] for m in metas)), 2),
    }
